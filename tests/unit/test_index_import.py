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
    assert doc["method"]["collisions"] == {"items": 39191, "codes_shared": 546, "items_sharing_a_code": 1229, "policy": "keep"}


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


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop(next(iter(t))), "have no code"),
    (lambda t: t.__setitem__("not-an-item", ["<a_1>", "<b_2>", "<c_3>", "<d_4>"]), "not in the data"),
    (lambda t: t.__setitem__(next(iter(t)), ["<a_1>", "<b_2>", "<c_3>"]), "same depth"),
    (lambda t: t.__setitem__(next(iter(t)), ["<a_1>", "<c_2>", "<b_3>", "<d_4>"]), "not of the form <b_N>"),
], ids=["missing-item", "unknown-item", "mixed-depth", "level-order"])
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
