"""Reading back what the framework wrote: the one place where a missing, empty, truncated or
malformed file becomes one line that names the file, says what is wrong with it and what to do.

Every file a later step reads back goes through here: a dataset folder's manifest, item maps,
item index, shards and what appends keep; a run folder's state, window records, period configs,
summaries and metrics, adapters (an anchor is its start adapter's), models, the tokenizer, item
vectors, sequence chunks and checkpoints' completion marks; an export's files. A problem is a `DamagedFile` (a ValueError), whose text is the line:

    <what> <path> <problem>; <remedy>

Every entry point prints it as `error: <line>` and exits with 2 (train/main.py, `python -m
launcher ...`, `python -m data_tools ...`), and under several ranks it is printed once
(train/dist/strategy.py, `DeepSpeedStrategy.agree`). Reading never writes: nothing finished is
rewritten while a problem is reported. Writing is data_tools/atomic.py.

No torch here: safetensors and numpy are imported where a file of theirs is read.
"""

from __future__ import annotations

import json
import os
import struct

import orjson  # the JSON-lines files are written with it; 3x faster than json on large ones (pending.jsonl)

from data_tools.textio import sha256_file

RAISE = object()  # `missing=RAISE`: a missing file is a DamagedFile (the default)

_TYPE_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    type(None): "null",
}


class DamagedFile(ValueError):
    """A file read back is missing, empty, truncated or malformed. `str(e)` is the one line to
    print: `<what> <path> <problem>; <remedy>`."""

    def __init__(self, path: str, problem: str | None = None, *, what: str = "", remedy: str = ""):
        if problem is None:  # rebuilt from its text alone (a DataLoader worker's exception, pickling)
            line = _line_of(path)
        else:
            line = f"{what} {path} {problem}" if what else f"{path} {problem}"
            if remedy:
                line += f"; {remedy}"
        super().__init__(line)
        self.line, self.path = line, path if problem is not None else None

    def __reduce__(self):
        return (DamagedFile, (self.line,))


def _line_of(text: str) -> str:
    """The line itself, also out of the text a DataLoader worker's exception becomes in the main
    process ("Caught DamagedFile in DataLoader worker process 0. Original Traceback ...")."""
    marker = f"{DamagedFile.__module__}.{DamagedFile.__name__}: "
    for line in reversed(text.splitlines()):
        for prefix in (marker, "DamagedFile: "):
            if line.startswith(prefix):
                return line[len(prefix) :]
    return text


def _size(path: str, what: str, remedy: str, missing) -> int | None:
    """The file's size, or None if it is missing and `missing` says so."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if missing is RAISE:
            raise DamagedFile(path, "is missing", what=what, remedy=remedy) from None
        return None
    except OSError as e:
        raise DamagedFile(path, f"cannot be read ({e.strerror or e})", what=what, remedy=remedy) from None
    if not os.path.isfile(path):
        raise DamagedFile(path, "is not a file", what=what, remedy=remedy)
    return st.st_size


def read_size(path: str, *, what: str = "", remedy: str = "") -> int:
    """The size of a file that must be there."""
    return _size(path, what, remedy, RAISE)


def read_bytes(path: str, *, what: str = "", remedy: str = "", missing=RAISE, empty_ok: bool = False):
    """The file's bytes; `missing` (if given) when there is no file. An empty file is damaged
    unless `empty_ok`."""
    size = _size(path, what, remedy, missing)
    if size is None:
        return missing
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:  # removed in between
        if missing is RAISE:
            raise DamagedFile(path, "is missing", what=what, remedy=remedy) from None
        return missing
    except OSError as e:
        raise DamagedFile(path, f"cannot be read ({e.strerror or e})", what=what, remedy=remedy) from None
    if not data and not empty_ok:
        raise DamagedFile(path, "is empty", what=what, remedy=remedy)
    return data


def _parse_json(data: bytes, path: str, what: str, remedy: str, where: str = ""):
    try:
        return json.loads(data.decode("utf-8"))  # not json's own guess, which takes \xff\xfe for UTF-16
    except UnicodeDecodeError:
        raise DamagedFile(
            path, f"is not UTF-8 text{where} (truncated or overwritten?)", what=what, remedy=remedy
        ) from None
    except json.JSONDecodeError as e:
        if not data.rstrip().endswith((b"}", b"]")):  # every JSON file written here ends its document
            problem = f"is truncated{where}: it ends at byte {len(data):,} inside its JSON ({e.msg})"
        else:
            problem = f"is not valid JSON{where} (hand-edited? {e.msg}, line {e.lineno} column {e.colno})"
        raise DamagedFile(path, problem, what=what, remedy=remedy) from None


def read_json(
    path: str,
    *,
    what: str = "",
    remedy: str = "",
    missing=RAISE,
    kind: type | tuple = dict,
    fields: dict | None = None,
):
    """The JSON document of `path`; `missing` (if given) when there is no file. The document
    must be of `kind` (an object by default) and, for an object, have `fields` (name -> type or
    tuple of types; see `check_fields`)."""
    if missing is not RAISE and not os.path.lexists(path):
        return missing
    data = read_bytes(path, what=what, remedy=remedy)
    doc = _parse_json(data, path, what, remedy)
    if not isinstance(doc, kind):
        raise DamagedFile(path, f"holds {_type_name(doc)}, not {_kinds(kind)}", what=what, remedy=remedy)
    if fields:
        check_fields(doc, fields, path, what=what, remedy=remedy)
    return doc


def check_fields(doc, fields: dict, path: str, *, what: str = "", remedy: str = "", where: str = ""):
    """That the object `doc` (read from `path`) has each field of `fields` with a value of its
    type (a type or a tuple of types; `int` never accepts a bool, `float` also takes an int).
    `where`: the part of the file `doc` is ("window 3's shards"). Returns `doc`."""
    at = f" ({where})" if where else ""
    if not isinstance(doc, dict):
        raise DamagedFile(path, f"holds {_type_name(doc)}{at} where an object belongs", what=what, remedy=remedy)
    for name, kind in fields.items():
        if name not in doc:
            raise DamagedFile(path, f"has no {name!r}{at} (hand-edited?)", what=what, remedy=remedy)
        if not _is(doc[name], kind):
            raise DamagedFile(
                path,
                f"has {_type_name(doc[name])} as {name!r}{at}, not {_kinds(kind)} (hand-edited?)",
                what=what,
                remedy=remedy,
            )
    return doc


def _is(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    for k in kinds:
        if k is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if k not in (int, float) and isinstance(value, k):
            return True
    return False


def _type_name(value) -> str:
    for k, name in _TYPE_NAMES.items():
        if type(value) is k:
            return name
    return type(value).__name__


def _kinds(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)


def iter_jsonl(path: str, *, what: str = "", remedy: str = "", fields: dict | None = None, kind: type = dict):
    """The objects (or other `kind`) of a JSON-lines file, one per line (blank lines skipped),
    each with `fields`; a line that is not one names its number, and a last line without its
    newline is a file cut short. An empty file holds none."""
    size = _size(path, what, remedy, RAISE)
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    cut = not line.endswith(b"\n") and f.tell() >= size
                    yield _jsonl_value(line, number, cut, path, what, remedy, fields, kind)
    except OSError as e:
        raise DamagedFile(path, f"cannot be read ({e.strerror or e})", what=what, remedy=remedy) from None


def _jsonl_value(line: bytes, number: int, last_cut: bool, path: str, what: str, remedy: str, fields, kind):
    if last_cut:  # every line the framework writes ends with a newline
        raise DamagedFile(path, f"is truncated: its last line ({number}) is cut short", what=what, remedy=remedy)
    where = f" at line {number}"
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise DamagedFile(
            path, f"is not valid JSON lines{where} (truncated or hand-edited?)", what=what, remedy=remedy
        ) from None
    if not isinstance(doc, kind):
        raise DamagedFile(path, f"holds {_type_name(doc)}{where}, not {_kinds(kind)}", what=what, remedy=remedy)
    if fields:
        check_fields(doc, fields, path, what=what, remedy=remedy, where=f"line {number}")
    return doc


def read_jsonl(path: str, *, what: str = "", remedy: str = "", fields: dict | None = None, kind: type = dict) -> list:
    """Every object (or other `kind`) of a JSON-lines file (see `iter_jsonl`)."""
    return list(iter_jsonl(path, what=what, remedy=remedy, fields=fields, kind=kind))


# ---- safetensors --------------------------------------------------------------------------------


def check_safetensors(path: str, *, what: str = "", remedy: str = "", missing=RAISE):
    """The header of a safetensors file (name -> {dtype, shape, data_offsets}), checked against the
    file without reading a tensor: a header that parses and a size that is exactly the header's
    plus the tensors' it declares. `missing` (if given) when there is no file."""
    size = _size(path, what, remedy, missing)
    if size is None:
        return missing
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                problem = "is empty" if not head else f"is {len(head)} bytes: not a safetensors file (truncated?)"
                raise DamagedFile(path, problem, what=what, remedy=remedy)
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise DamagedFile(
                    path,
                    f"is truncated: {size:,} bytes, shorter than its own header says ({n + 8:,} at least)",
                    what=what,
                    remedy=remedy,
                )
            raw = f.read(n)
    except OSError as e:
        raise DamagedFile(path, f"cannot be read ({e.strerror or e})", what=what, remedy=remedy) from None
    header = _parse_json(raw, path, what, remedy, where=" in its safetensors header")
    if not isinstance(header, dict):
        raise DamagedFile(path, "has a safetensors header that is not an object", what=what, remedy=remedy)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise DamagedFile(path, f"has a malformed safetensors entry {name!r}", what=what, remedy=remedy)
        end = max(end, offsets[1])
    if size != 8 + n + end:
        state = "is truncated" if size < 8 + n + end else "has bytes beyond its tensors"
        raise DamagedFile(
            path, f"{state}: {size:,} bytes where its header says {8 + n + end:,}", what=what, remedy=remedy
        )
    return header


def load_safetensors(path: str, *, what: str = "", remedy: str = "", device: str = "cpu"):
    """The tensors of a safetensors file (name -> torch.Tensor), checked first (`check_safetensors`)."""
    check_safetensors(path, what=what, remedy=remedy)
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except Exception as e:  # SafetensorError and friends: the file changed under us, or is malformed inside
        raise DamagedFile(path, f"cannot be loaded ({_first_line(e)})", what=what, remedy=remedy) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---- numpy --------------------------------------------------------------------------------------


def load_npy(path: str, *, what: str = "", remedy: str = "", mmap_mode=None):
    """A numpy array file (`.npy`), or the arrays of an `.npz` (read whole, not lazily)."""
    import numpy as np

    size = _size(path, what, remedy, RAISE)
    if size == 0:
        raise DamagedFile(path, "is empty", what=what, remedy=remedy)
    try:
        loaded = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {k: loaded[k] for k in loaded.files}
        return loaded
    except Exception as e:  # ValueError, EOFError, zipfile.BadZipFile, OSError
        raise DamagedFile(
            path, f"is truncated or not a numpy file ({_first_line(e)})", what=what, remedy=remedy
        ) from None


# ---- dataset shards -----------------------------------------------------------------------------


def check_shard(path: str, record: dict, *, what: str = "", remedy: str = "", full: bool = False) -> None:
    """That a shard is the one its manifest record (`bytes`, and `sha256` where recorded) names:
    its size always, its sha256 with `full` (one read of the file)."""
    size = _size(path, what, remedy, RAISE)
    if size != record.get("bytes", size):
        cut = " (truncated?)" if size < record["bytes"] else ""
        raise DamagedFile(
            path,
            f"is damaged: {size:,} bytes where the manifest says {record['bytes']:,}{cut}",
            what=what,
            remedy=remedy,
        )
    if full and record.get("sha256"):
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise DamagedFile(path, f"cannot be read ({e.strerror or e})", what=what, remedy=remedy) from None
        if digest != record["sha256"]:
            raise DamagedFile(
                path,
                "is damaged: its sha256 is not the one the manifest records (overwritten or edited since "
                "it was converted)",
                what=what,
                remedy=remedy,
            )
