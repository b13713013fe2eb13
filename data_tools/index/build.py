"""`index`: give every item of a dataset folder its semantic ID, in `item_index.json`.

Built: item texts -> embeddings (`embed`) -> an RQ-VAE (`rqvae`) fit on the items of the first
window only (the first period's catalog: later items must not shape the codes a model has
already learned) -> codes, made unique on the last level (`codes.assign_unique`). Items of later
windows are coded by the frozen quantizer, window by window, each window's collisions resolved
against every code already taken. The quantizer is saved next to the index
(`item_index.rqvae.safetensors`), so a rerun on a dataset with more items codes only the new
ones and never changes an existing code.

Imported: an existing `item_id -> tokens` file (like the paper's `semantic_ids.json`), validated
against the dataset's items (`codes.import_codes`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from data_tools.accounting import InputError
from data_tools.atomic import atomic_write_bytes, writing
from data_tools.dataset import ITEM_INDEX, ITEMS, dataset_remedy
from data_tools.index.codes import assign_unique, collision_groups, load_item_index, parse_tokens, write_item_index
from data_tools.index.embed import Embedder
from data_tools.index.rqvae import RQVAE, RQVAEConfig, fit_rqvae
from data_tools.readback import read_jsonl

QUANTIZER = "item_index.rqvae.safetensors"
POLICY = "nearest_free_last_level"


@dataclass(frozen=True)
class CodingOptions:
    """How `build_index` codes items: the embedder (minilm, hf:PATH or npy:PATH), and the
    RQ-VAE's depth (`levels`), codes per level, seed and training epochs (None: sized to the
    catalog). A rerun that codes new items of an existing index needs the embedder, levels and
    codes it was built with."""

    embedder: str = "minilm"
    levels: int = 4
    codes: int = 256
    seed: int = 0
    epochs: int | None = None


def _say(log, msg: str) -> None:
    print(msg, file=log or sys.stderr, flush=True)


def read_items(root: str) -> list[dict]:
    """The rows of the dataset's items.jsonl, by item id."""
    path = os.path.join(root, ITEMS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{root} has no {ITEMS}; create the dataset with `python -m data_tools convert`")
    items = read_jsonl(
        path, what="the dataset's items", remedy=dataset_remedy(root), fields={"item_id": int, "source_id": (str, int)}
    )
    if not items:
        raise InputError("no items", path)
    if len({it["item_id"] for it in items}) != len(items):
        raise InputError("item ids are not unique", path)
    return sorted(items, key=lambda it: it["item_id"])


def _normalize_embedder(spec: str) -> str:
    """The spec as recorded: hf:/npy: paths made absolute, so a rerun from elsewhere matches."""
    kind, _, arg = spec.partition(":")
    return f"{kind}:{os.path.abspath(arg)}" if kind in ("hf", "npy") and arg else spec


def _texts(items: list[dict], embedder: str, log) -> list[str]:
    texts = [it.get("text") or it.get("title") or "" for it in items]
    if embedder.startswith("npy:"):
        return texts
    empty = sum(1 for t in texts if not t.strip())
    if empty == len(texts):
        raise InputError(
            f"the {len(texts):,} items to code have no text (title or description), so there is nothing to embed; "
            "import an existing index with `python -m data_tools index DIR --import semantic_ids.json`, "
            "or give precomputed embeddings with --embedder npy:PATH"
        )
    if empty:
        _say(
            log,
            f"warning: {empty:,} of {len(texts):,} items have no text; their codes only separate them from the others",
        )
    return texts


def _save_quantizer(root: str, model: RQVAE) -> dict:
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in model.state_dict().items()})
    atomic_write_bytes(os.path.join(root, QUANTIZER), data)
    return {"file": QUANTIZER, "sha256": hashlib.sha256(data).hexdigest()}


def _load_quantizer(root: str, method: dict) -> RQVAE:
    from safetensors.torch import load

    path = os.path.join(root, method["quantizer"]["file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: new items cannot be coded like the old ones; "
            "rebuild the whole index with --force (every code may change)"
        )
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != method["quantizer"]["sha256"]:
        raise InputError(f"the quantizer is not the one {ITEM_INDEX} was made with; rebuild with --force", path)
    model = RQVAE(RQVAEConfig.from_json(method["rqvae"]))
    model.load_state_dict(load(data))
    return model.eval()


def _check_rerun(root: str, index: dict, coding: CodingOptions) -> None:
    method = index["method"]
    recorded = {
        "--embedder": method["embedder"],
        "--levels": method["rqvae"]["levels"],
        "--codes": method["rqvae"]["codes"],
    }
    given = {"--embedder": coding.embedder, "--levels": coding.levels, "--codes": coding.codes}
    for name, value in given.items():
        if value != recorded[name]:
            raise InputError(
                f"{os.path.join(root, ITEM_INDEX)} was built with {name} {recorded[name]}, not {value}: "
                f"new items must be coded like the old ones; pass {name} {recorded[name]}, "
                "or rebuild with --force (every code may change)"
            )


def _fit(x: np.ndarray, window: int, config: RQVAEConfig, embedder: str, progress: bool, log) -> tuple[RQVAE, dict]:
    """Fit the quantizer on one window's embeddings; returns it and the index's `method` record
    (how the codes are made; the quantizer's file is filled in when it is saved)."""
    t0 = time.perf_counter()
    model, training = fit_rqvae(x, config, progress=progress)
    _say(
        log,
        f"fit the RQ-VAE on the {len(x):,} items of window {window} in {time.perf_counter() - t0:.1f} s "
        f"({training['epochs']} epochs; reconstruction loss {training['start']['reconstruction']:.4f} -> "
        f"{training['end']['reconstruction']:.4f})",
    )
    return model, {
        "kind": "rqvae",
        "embedder": embedder,
        "embedding_dim": int(x.shape[1]),
        "fit": {"first_window": window, "items": len(x)},
        "rqvae": config.to_json(),
        "training": training,
        "quantizer": None,
        "collisions": {"policy": POLICY, "steps": []},
    }


@dataclass
class _Codes:
    """The codes of a build so far: the quantizer (None until it is fit), the index's `method`
    record, and item id -> code of every item coded."""

    model: RQVAE | None = None
    method: dict | None = None
    assigned: dict = field(default_factory=dict)


def build_index(
    root: str,
    coding: CodingOptions = CodingOptions(),
    *,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
    log=None,
) -> dict:
    """Build (or extend) the item index of the dataset at `root`; returns the item_index.json
    document. Without `force`, an existing index keeps every code and only items without one
    are coded; with nothing new, nothing is written. `device` is for the embedder; the RQ-VAE
    trains on the CPU (it is small, and CPU arithmetic keeps the codes reproducible).
    """
    if not 1 <= coding.levels <= 26 or coding.codes < 2:
        raise ValueError(
            "need 1 to 26 levels (one letter each) and at least 2 codes, "
            f"got --levels {coding.levels} --codes {coding.codes}"
        )
    coding = replace(coding, embedder=_normalize_embedder(coding.embedder))
    items = read_items(root)
    if force or not os.path.isfile(os.path.join(root, ITEM_INDEX)):
        todo, codes = items, _Codes()
    else:
        index = load_item_index(root)
        todo = _uncoded_items(root, index, items)
        if not todo:
            _say(
                log,
                f"{os.path.join(root, ITEM_INDEX)} is up to date: all {len(items):,} items have codes "
                f"({index['method']['kind']}); nothing to do (--force rebuilds it)",
            )
            return index
        codes = _codes_so_far(root, index, todo, coding)
    texts = _texts(todo, coding.embedder, log)
    embed = Embedder(coding.embedder, device=device, progress=progress)
    embed_seconds = _code_window_by_window(todo, texts, embed, codes, coding, progress, log)
    doc = _write_built_index(root, codes, coding.codes)
    collisions = codes.method["collisions"]
    _say(
        log,
        f"coded {len(todo):,} new items ({len(codes.assigned):,} in all; embedded with {coding.embedder} in "
        f"{embed_seconds:.1f} s): {collisions['before']['items_sharing_a_code']:,} collided, "
        f"{sum(s['reassigned'] for s in collisions['steps']):,} moved to a free last-level code, none share a code "
        f"now; perplexity per level {doc['perplexity']} of {coding.codes}; wrote {os.path.join(root, ITEM_INDEX)}",
    )
    return doc


def _uncoded_items(root: str, index: dict, items: list[dict]) -> list[dict]:
    """The items that the existing index has no code for (it may code no item the dataset lacks)."""
    known = {it["item_id"] for it in items}
    stale = [k for k in index["items"] if int(k) not in known]
    if stale:
        raise InputError(
            f"{ITEM_INDEX} codes {len(stale)} items that {ITEMS} lacks (first: {stale[:5]}): "
            "the dataset was reconverted with other items; rebuild with --force",
            root,
        )
    return [it for it in items if str(it["item_id"]) not in index["items"]]


def _codes_so_far(root: str, index: dict, todo: list[dict], coding: CodingOptions) -> _Codes:
    """An existing built index, to code the `todo` items like the old ones: its frozen quantizer,
    its method record and its codes."""
    if index["method"]["kind"] != "rqvae":
        raise InputError(
            f"{ITEM_INDEX} was imported ({index['method'].get('path')}) and lacks {len(todo):,} items: "
            "import a file that covers them, or build a new index with --force",
            root,
        )
    _check_rerun(root, index, coding)
    return _Codes(
        model=_load_quantizer(root, index["method"]),
        method=index["method"],
        assigned={int(k): parse_tokens(v, f"{ITEM_INDEX}: item {k}") for k, v in index["items"].items()},
    )


def _code_window_by_window(
    todo: list[dict], texts: list[str], embed: Embedder, codes: _Codes, coding: CodingOptions, progress: bool, log
) -> float:
    """Code the `todo` items into `codes`, window by window, in order; returns the seconds spent
    embedding. An item's code never depends on items first seen after it, so a later rerun that
    adds windows gives every earlier item the code it has now. Each window is embedded in a call
    of its own for the same reason (an embedding varies a little with the batch it is computed
    in). A new index's quantizer is fit on its first window, then frozen."""
    windows: dict[int, list[int]] = {}
    for r, it in enumerate(todo):
        windows.setdefault(it["first_window"], []).append(r)
    embed_seconds = 0.0
    for window, rows in sorted(windows.items()):
        t0 = time.perf_counter()
        x = embed([texts[r] for r in rows], [todo[r]["item_id"] for r in rows])
        embed_seconds += time.perf_counter() - t0
        if codes.model is None:
            config = RQVAEConfig(
                input_dim=x.shape[1], levels=coding.levels, codes=coding.codes, epochs=coding.epochs, seed=coding.seed
            )
            codes.model, codes.method = _fit(x, window, config, coding.embedder, progress, log)
        natural, residuals = codes.model.encode(x)
        last_codebook = codes.model.codebooks[-1].detach().numpy()
        unique, report = assign_unique(natural, residuals, last_codebook, set(codes.assigned.values()))
        for r, code in zip(rows, unique.tolist()):
            codes.assigned[todo[r]["item_id"]] = tuple(code)
        codes.method["collisions"]["steps"].append({"first_window": window, **report})
    return embed_seconds


def _write_built_index(root: str, codes: _Codes, codes_per_level: int) -> dict:
    """item_index.json, with the collisions before and after resolution in its method record,
    and the quantizer beside it if it is new."""
    collisions = codes.method["collisions"]
    steps = collisions["steps"]
    groups = collision_groups(codes.assigned)
    if groups:  # assign_unique guarantees none; one here is a bug, not bad input
        raise AssertionError(f"{len(groups)} codes are still shared after collision resolution")
    collisions["before"] = {
        "items_sharing_a_code": sum(s["colliding_items"] for s in steps),
        "codes_shared": sum(s["codes_contested"] for s in steps),
    }
    collisions["after"] = {"items_sharing_a_code": 0, "codes_shared": 0}
    with writing("cannot write the item index", root):
        if codes.method["quantizer"] is None:  # saved only now: a failed build leaves the old pair intact
            codes.method["quantizer"] = _save_quantizer(root, codes.model)
        return write_item_index(root, codes.assigned, codes.method, codes_per_level)


def import_index(
    root: str, path: str, collisions: str = "keep", codes: int = 256, force: bool = False, log=None
) -> dict:
    """Import an `item_id -> tokens` file as the item index of the dataset at `root` (source item
    ids of the file -> the dataset's dense ids); returns the item_index.json document. An
    existing index is replaced only with `force`, unless it is this very import."""
    from data_tools.index.codes import import_codes

    items = read_items(root)
    target = os.path.join(root, ITEM_INDEX)
    codes_, method = import_codes(path, {str(it["source_id"]): it["item_id"] for it in items}, collisions)
    if os.path.isfile(target) and not force:
        old = load_item_index(root)["method"]
        same = (
            old.get("kind") == "import"
            and old.get("sha256") == method["sha256"]
            and old.get("collisions", {}).get("policy") == collisions
        )
        if same:
            _say(log, f"{target} is up to date with {path}; nothing to do")
            return load_item_index(root)
        raise InputError(
            f"{target} exists ({old.get('kind')}); --force replaces it (the codes change, "
            "and models trained on the old ones no longer match)"
        )
    with writing("cannot write the item index", root):
        doc = write_item_index(
            root, codes_, method, codes_per_level=max(codes, 1 + max(max(c) for c in codes_.values()))
        )
        stale = os.path.join(root, QUANTIZER)
        if os.path.exists(stale):  # the quantizer of a replaced built index codes nothing now
            os.unlink(stale)
    r = method["collisions"]
    extra = (
        f" ({method['items_not_in_data']:,} more that the data lacks left out)" if method["items_not_in_data"] else ""
    )
    _say(
        log,
        f"imported {r['items']:,} items from {path}{extra}: {r['items_sharing_a_code']:,} items share "
        f"{r['codes_shared']:,} codes (policy {r['policy']}); perplexity per level {doc['perplexity']}; wrote {target}",
    )
    return doc


def index_main(args) -> None:
    """`python -m data_tools index DIR ...` (arguments declared in data_tools/__main__.py)."""
    if args.import_path:
        import_index(args.dir, args.import_path, args.collisions, codes=args.codes, force=args.force)
    else:
        coding = CodingOptions(
            embedder=args.embedder, levels=args.levels, codes=args.codes, seed=args.seed, epochs=args.epochs
        )
        build_index(args.dir, coding, device=args.device, force=args.force, progress=not args.no_progress)
