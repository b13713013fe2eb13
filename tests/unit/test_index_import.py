"""Importing an existing index (the paper's CDs semantic_ids.json) into a converted dataset."""

from __future__ import annotations

import io
import json
import os
import sys

import pytest

from data_tools.accounting import InputError
from data_tools.convert import ConvertOptions, convert
from data_tools.dataset import ITEM_INDEX
from data_tools.index.build import build_index, import_index, read_items
from data_tools.index.codes import collision_groups


@pytest.fixture(scope="module")
def cds(cds_blocks, tmp_path_factory):
    """The CDs blocks converted without their index, and the index file itself."""
    out = str(tmp_path_factory.mktemp("cds") / "ds")
    convert(ConvertOptions(format="blocks", reviews=cds_blocks, out=out, progress=False, log=sys.stdout))
    path = os.path.join(cds_blocks, "semantic_ids.json")
    with open(path) as f:
        return out, path, json.load(f)


def test_import_round_trips_the_cds_index(cds):
    root, path, original = cds
    doc = import_index(root, path, log=io.StringIO())
    items = read_items(root)
    assert sum(it["item_id"] != int(it["source_id"]) for it in items) > 30000  # dense ids really differ
    assert len(doc["items"]) == len(items) == len(original) == 39191
    for it in items:  # dense id -> source id -> the file's tokens
        assert doc["items"][str(it["item_id"])] == original[it["source_id"]]
    assert doc["levels"] == 4 and doc["codes_per_level"] == 256 and len(doc["perplexity"]) == 4
    # Kept as released (policy keep): 1,229 items share 546 codes.
    assert doc["method"]["collisions"] == {
        "items": 39191,
        "codes_shared": 546,
        "items_sharing_a_code": 1229,
        "policy": "keep",
    }


def test_reimport_is_up_to_date_and_replacing_needs_force(cds):
    root, path, _ = cds
    import_index(root, path, log=io.StringIO())
    stamp = os.stat(os.path.join(root, ITEM_INDEX)).st_mtime_ns
    log = io.StringIO()
    import_index(root, path, log=log)
    assert "up to date" in log.getvalue() and os.stat(os.path.join(root, ITEM_INDEX)).st_mtime_ns == stamp
    with pytest.raises(InputError, match="--force"):
        import_index(root, path, collisions="extend", log=io.StringIO())
    # `index` without --import on an imported index that covers every item: nothing to do (the
    # CDs items have no text, so a build would be impossible anyway).
    log = io.StringIO()
    build_index(root, log=log)
    assert "up to date" in log.getvalue()


def test_extend_policy_makes_codes_unique(cds, tmp_path):
    root, path, original = cds
    doc = import_index(root, path, collisions="extend", force=True, log=io.StringIO())
    codes = {k: tuple(v) for k, v in doc["items"].items()}
    assert doc["levels"] == 5 and not collision_groups(codes)
    items = read_items(root)
    assert all(doc["items"][str(it["item_id"])][:4] == original[it["source_id"]] for it in items)
    import_index(root, path, force=True, log=io.StringIO())  # back to the released index for the other tests


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.pop(next(iter(t))), "have no code"),
        (lambda t: t.__setitem__(next(iter(t)), ["<a_1>", "<b_2>", "<c_3>"]), "same depth"),
        (lambda t: t.__setitem__(next(iter(t)), ["<a_1>", "<c_2>", "<b_3>", "<d_4>"]), "not of the form <b_N>"),
    ],
    ids=["missing-item", "mixed-depth", "level-order"],
)
def test_import_rejects_a_damaged_index(cds, tmp_path, damage, message):
    root, _, original = cds
    table = dict(original)
    damage(table)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(table))
    with pytest.raises(InputError, match=message):
        import_index(root, str(bad), force=True, log=io.StringIO())


def test_error_policy_refuses_shared_codes(cds):
    root, path, _ = cds
    with pytest.raises(InputError, match="share 546 codes"):
        import_index(root, path, collisions="error", force=True, log=io.StringIO())


# ---- a catalog-wide index over a slice of the data --------------------------------------------


def _tiny_blocks(folder) -> list[str]:
    """Two blocks of 3 users x 6 items over the items i0..i9; returns the item ids."""
    current = {f"u{u}": [f"i{(u + k) % 10}" for k in range(6)] for u in range(3)}
    later = {user: [f"i{(int(user[1]) + k + 5) % 10}" for k in range(6)] for user in current}
    (folder / "block_0.json").write_text(
        json.dumps({u: {"previous_block": [], "current_block": c} for u, c in current.items()})
    )
    (folder / "block_1.json").write_text(
        json.dumps({u: {"previous_block": current[u], "current_block": later[u]} for u in current})
    )
    return [f"i{k}" for k in range(10)]


def _catalog(items: list[str], extra: int) -> dict:
    """Unique codes for `items` and for `extra` items that no block mentions."""
    names = items + [f"elsewhere{k}" for k in range(extra)]
    return {name: [f"<a_{k}>", "<b_0>", "<c_0>", "<d_0>"] for k, name in enumerate(names)}


@pytest.fixture
def tiny_blocks(tmp_path):
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    items = _tiny_blocks(blocks)
    index = tmp_path / "catalog.json"
    index.write_text(json.dumps(_catalog(items, extra=3)))
    return str(blocks), str(index), items


def test_convert_accepts_an_index_of_more_items_and_records_the_extra_count(tiny_blocks, tmp_path):
    blocks, index, items = tiny_blocks
    out = str(tmp_path / "ds")
    manifest = convert(
        ConvertOptions(format="blocks", reviews=blocks, index=index, out=out, progress=False, log=io.StringIO())
    )
    (source,) = [s for s in manifest["sources"] if s["role"] == "index"]
    assert source["items_not_in_data"] == 3
    with open(os.path.join(out, ITEM_INDEX)) as f:
        doc = json.load(f)
    assert len(doc["items"]) == len(items) and doc["method"]["items_not_in_data"] == 3


def test_import_accepts_an_index_of_more_items_and_records_the_extra_count(tiny_blocks, tmp_path):
    blocks, index, items = tiny_blocks
    out = str(tmp_path / "ds")
    convert(ConvertOptions(format="blocks", reviews=blocks, out=out, progress=False, log=io.StringIO()))
    log = io.StringIO()
    doc = import_index(out, index, log=log)
    assert len(doc["items"]) == len(items) and doc["method"]["items_not_in_data"] == 3
    assert "3 more that the data lacks left out" in log.getvalue()


def test_items_of_the_data_without_a_code_stay_an_error(tiny_blocks, tmp_path):
    blocks, index, items = tiny_blocks
    with open(index) as f:
        table = json.load(f)
    del table[items[0]]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(table))
    with pytest.raises(InputError, match="1 items of the data have no code"):
        convert(
            ConvertOptions(
                format="blocks",
                reviews=blocks,
                index=str(partial),
                out=str(tmp_path / "a"),
                progress=False,
                log=io.StringIO(),
            )
        )
    out = str(tmp_path / "b")
    convert(ConvertOptions(format="blocks", reviews=blocks, out=out, progress=False, log=io.StringIO()))
    with pytest.raises(InputError, match="1 items of the data have no code"):
        import_index(out, str(partial), log=io.StringIO())
