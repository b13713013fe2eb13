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

import numpy as np
import orjson

from data_tools.accounting import InputError
from data_tools.atomic import atomic_write_bytes, writing
from data_tools.dataset import ITEM_INDEX, ITEMS
from data_tools.index.codes import assign_unique, collision_groups, load_item_index, parse_tokens, write_item_index
from data_tools.index.embed import Embedder
from data_tools.index.rqvae import RQVAE, RQVAEConfig, fit_rqvae

QUANTIZER = "item_index.rqvae.safetensors"
POLICY = "nearest_free_last_level"


def _say(log, msg: str) -> None:
    print(msg, file=log or sys.stderr, flush=True)


def read_items(root: str) -> list[dict]:
    """The rows of the dataset's items.jsonl, by item id."""
    path = os.path.join(root, ITEMS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{root} has no {ITEMS}; create the dataset with `python -m data_tools convert`")
    with open(path, "rb") as f:
        items = [orjson.loads(line) for line in f if line.strip()]
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


def _check_rerun(root: str, index: dict, embedder: str, levels: int, codes: int) -> None:
    method = index["method"]
    recorded = {
        "--embedder": method["embedder"],
        "--levels": method["rqvae"]["levels"],
        "--codes": method["rqvae"]["codes"],
    }
    given = {"--embedder": embedder, "--levels": levels, "--codes": codes}
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


def build_index(
    root: str,
    embedder: str = "minilm",
    levels: int = 4,
    codes: int = 256,
    seed: int = 0,
    epochs: int | None = None,
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
    if not 1 <= levels <= 26 or codes < 2:
        raise ValueError(
            f"need 1 to 26 levels (one letter each) and at least 2 codes, got --levels {levels} --codes {codes}"
        )
    embedder = _normalize_embedder(embedder)
    items = read_items(root)
    index = None if force or not os.path.isfile(os.path.join(root, ITEM_INDEX)) else load_item_index(root)
    model, method, assigned = None, None, {}
    todo = items
    if index is not None:
        known = {it["item_id"] for it in items}
        stale = [k for k in index["items"] if int(k) not in known]
        if stale:
            raise InputError(
                f"{ITEM_INDEX} codes {len(stale)} items that {ITEMS} lacks (first: {stale[:5]}): "
                "the dataset was reconverted with other items; rebuild with --force",
                root,
            )
        todo = [it for it in items if str(it["item_id"]) not in index["items"]]
        kind = index["method"]["kind"]
        if not todo:
            _say(
                log,
                f"{os.path.join(root, ITEM_INDEX)} is up to date: all {len(items):,} items have codes ({kind}); "
                "nothing to do (--force rebuilds it)",
            )
            return index
        if kind != "rqvae":
            raise InputError(
                f"{ITEM_INDEX} was imported ({index['method'].get('path')}) and lacks {len(todo):,} items: "
                "import a file that covers them, or build a new index with --force",
                root,
            )
        _check_rerun(root, index, embedder, levels, codes)
        model, method = _load_quantizer(root, index["method"]), index["method"]
        assigned = {int(k): parse_tokens(v, f"{ITEM_INDEX}: item {k}") for k, v in index["items"].items()}

    texts = _texts(todo, embedder, log)
    windows: dict[int, list[int]] = {}
    for r, it in enumerate(todo):
        windows.setdefault(it["first_window"], []).append(r)
    embed = Embedder(embedder, device=device, progress=progress)
    embed_seconds = 0.0
    # Window by window, in order: an item's code never depends on items first seen after it, so
    # a later rerun that adds windows gives every earlier item the code it has now. Each window
    # is embedded in a call of its own for the same reason (an embedding varies a little with
    # the batch it is computed in).
    for window, rows in sorted(windows.items()):
        t0 = time.perf_counter()
        x = embed([texts[r] for r in rows], [todo[r]["item_id"] for r in rows])
        embed_seconds += time.perf_counter() - t0
        if model is None:  # a new index: the quantizer is fit on its first window, then frozen
            config = RQVAEConfig(input_dim=x.shape[1], levels=levels, codes=codes, epochs=epochs, seed=seed)
            model, method = _fit(x, window, config, embedder, progress, log)
        natural, residuals = model.encode(x)
        unique, report = assign_unique(natural, residuals, model.codebooks[-1].detach().numpy(), set(assigned.values()))
        for r, code in zip(rows, unique.tolist()):
            assigned[todo[r]["item_id"]] = tuple(code)
        method["collisions"]["steps"].append({"first_window": window, **report})

    collisions = method["collisions"]
    steps = collisions["steps"]
    groups = collision_groups(assigned)
    if groups:  # assign_unique guarantees none; one here is a bug, not bad input
        raise AssertionError(f"{len(groups)} codes are still shared after collision resolution")
    collisions["before"] = {
        "items_sharing_a_code": sum(s["colliding_items"] for s in steps),
        "codes_shared": sum(s["codes_contested"] for s in steps),
    }
    collisions["after"] = {"items_sharing_a_code": 0, "codes_shared": 0}
    with writing("cannot write the item index", root):
        if method["quantizer"] is None:  # saved only now: a failed build leaves the old pair intact
            method["quantizer"] = _save_quantizer(root, model)
        doc = write_item_index(root, assigned, method, codes)
    _say(
        log,
        f"coded {len(todo):,} new items ({len(assigned):,} in all; embedded with {embedder} in {embed_seconds:.1f} s): "
        f"{collisions['before']['items_sharing_a_code']:,} collided, {sum(s['reassigned'] for s in steps):,} moved to "
        f"a free last-level code, none share a code now; perplexity per level {doc['perplexity']} of {codes}; "
        f"wrote {os.path.join(root, ITEM_INDEX)}",
    )
    return doc


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
        build_index(
            args.dir,
            embedder=args.embedder,
            levels=args.levels,
            codes=args.codes,
            seed=args.seed,
            epochs=args.epochs,
            device=args.device,
            force=args.force,
            progress=not args.no_progress,
        )
