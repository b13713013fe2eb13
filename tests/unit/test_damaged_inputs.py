"""Damaged inputs on the training side (issue 27): every file the framework reads back, missing,
empty, cut short or hand-edited, is one line naming the file, what is wrong and what to do, with
exit code 2 and no traceback, through the real entry points (train/main.py, `python -m launcher
run/report/export/recommend`, `python -m data_tools inspect/index/append`); and nothing finished
is rewritten while it is reported. A damaged checkpoint is skipped for the one before it, with a
warning. The same on 2 ranks: tests/dist/test_damaged_inputs_on_ranks.py."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from data_tools.readback import DamagedFile, check_safetensors, iter_jsonl, read_json
from tests.conftest import small_stream

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
ENV.pop("RANK", None)
ENV.pop("WORLD_SIZE", None)
QUICK = [
    "model.period0=lora",
    "data.micro_batch_size=4",
    "schedule.global_batch_size=8",
    "logging.progress=false",
    "eval.every_period=false",
    "schedule.max_steps=2",
]


def run(*argv: str) -> subprocess.CompletedProcess:
    """`python ARGV` from the repository, as a user would start it."""
    return subprocess.run([sys.executable, *argv], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)


def train(data: str, run_dir: str, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "--ds_config",
        "ds_configs/zero2.json",
        "--config",
        "configs/tiny.yaml",
        "--data",
        data,
        "--run_dir",
        run_dir,
    ]
    return run("train/main.py", *args, *QUICK, *extra)


def launcher_run(data: str, run_dir: str, *extra: str) -> subprocess.CompletedProcess:
    args = ["--ds_config", "ds_configs/zero2.json", "--config", "configs/tiny.yaml", "--data", data, "--run", run_dir]
    return run("-m", "launcher", "run", *args, *QUICK, *extra)


def one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one `error:` line of a refused command (exit code 2, no traceback), holding `words`."""
    out = proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.returncode == 2, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert "Traceback" not in proc.stderr + proc.stdout, out
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def snapshot(folder: str) -> dict:
    """Every file under `folder` with its bytes and time of change: what a refusal must not touch."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[path] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def truncate(path: str, keep: float = 0.5) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.fixture
def data(small_dataset, tmp_path) -> str:
    """A copy of the small dataset (5 windows, random codes) to damage."""
    out = str(tmp_path / "ds")
    shutil.copytree(small_dataset, out)
    return out


def finished_run(folder, data: str, *, vectors: bool = False) -> str:
    """A run folder whose period 0 is finished (state.json, its config, adapter and summary), as
    far as the next period's checks read it; no training needed."""
    import torch
    from safetensors.torch import save_file

    from train.common.config import load_config

    root = folder / "run"
    period = root / "periods" / "0"
    (period / "adapter").mkdir(parents=True)
    (period / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"a.lora_A.weight": torch.zeros(2, 3)}, str(period / "adapter" / "adapter_model.safetensors"))
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), QUICK)
    cfg.data.path = data
    (period / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "device": "cpu"}))
    (period / "train_summary.json").write_text(json.dumps({"period": 0, "steps": 2}))
    if vectors:
        save_file({"codes": torch.zeros(3, 4, dtype=torch.int64)}, str(period / "item_vectors.safetensors"))
    (root / "state.json").write_text(json.dumps({"done": [0], "global_step": 2, "period": 0, "phase": "done"}))
    return str(root)


# ---- the list -----------------------------------------------------------------------------


def test_launcher_run_without_the_dataset_folder(tmp_path):
    proc = launcher_run(str(tmp_path / "nowhere"), str(tmp_path / "run"))
    one_line(proc, str(tmp_path / "nowhere"), "data_tools convert")
    assert not os.path.exists(tmp_path / "run")


def test_a_truncated_training_shard_is_named_with_how_to_rebuild_it(data, tmp_path):
    shard = os.path.join(data, "windows", "00", "train-000000.tar")
    truncate(shard)
    line = one_line(train(data, str(tmp_path / "run")), shard, "truncated", "data_tools convert", "--force")
    assert "consecutive" not in line
    assert not os.path.exists(tmp_path / "run" / "state.json")  # refused before anything is written


def test_a_shard_edited_in_place_is_found_by_its_sha256(data, tmp_path):
    """Same size, other bytes: the size check passes; the ranks' read of the shards against the
    manifest's sha256 (inside the process group, one rank here) finds it before training."""
    shard = os.path.join(data, "windows", "00", "valid-000000.tar")
    with open(shard, "r+b") as f:
        raw = f.read()
        at = raw.index(b'"target"')
        f.seek(at + 1)
        f.write(b"TARGET")
    one_line(train(data, str(tmp_path / "run")), shard, "sha256", "--force")
    assert not os.path.exists(tmp_path / "run" / "state.json")


def test_a_truncated_item_index_is_one_line_on_every_entry_point(data, tmp_path):
    index = os.path.join(data, "item_index.json")
    truncate(index)
    one_line(train(data, str(tmp_path / "run")), index, "truncated", "data_tools index")
    one_line(launcher_run(data, str(tmp_path / "run")), index, "truncated")
    codes = tmp_path / "codes.json"  # a code for every item: the import reaches the existing index
    sources = [row["source_id"] for row in iter_jsonl(os.path.join(data, "items.jsonl"))]
    codes.write_text(json.dumps({s: [f"<a_{k}>"] for k, s in enumerate(sources)}))
    before = snapshot(data)
    one_line(run("-m", "data_tools", "index", data, "--import", str(codes)), index, "truncated")
    assert snapshot(data) == before


def test_a_finished_periods_deleted_adapter_stops_the_next_period(data, tmp_path):
    run_dir = finished_run(tmp_path, data)
    shutil.rmtree(os.path.join(run_dir, "periods", "0", "adapter"))
    before = snapshot(run_dir)
    for proc in (train(data, run_dir), launcher_run(data, run_dir)):
        one_line(proc, "period 0's adapter", "is missing", "put", "new run folder")
    assert snapshot(run_dir) == before


def test_a_finished_periods_truncated_adapter_stops_the_next_period(data, tmp_path):
    run_dir = finished_run(tmp_path, data)
    adapter = os.path.join(run_dir, "periods", "0", "adapter", "adapter_model.safetensors")
    truncate(adapter, keep=0.9)
    one_line(train(data, run_dir), adapter, "truncated", "period 0 is finished")


def test_a_truncated_state_json_is_one_line_that_says_what_it_held(data, tmp_path):
    run_dir = finished_run(tmp_path, data)
    state = os.path.join(run_dir, "state.json")
    truncate(state)
    before = snapshot(run_dir)
    line = one_line(launcher_run(data, run_dir), state, "truncated")
    assert '{"done": [0], "global_step": 2, "period": 0, "phase": "done"}' in line
    one_line(train(data, run_dir), state, "truncated")
    assert snapshot(run_dir) == before


# ---- past the list ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state, words",
    [
        ({"done": "0", "global_step": 2, "period": 0, "phase": "done"}, ["'done'", "a string"]),
        ({"done": [0, "1"], "global_step": 2, "period": 0, "phase": "done"}, ["not a list of periods"]),
        ({"done": [0], "global_step": "2", "period": 0, "phase": "done"}, ["'global_step'"]),
        ({"done": [0], "phase": "finished"}, ["phase 'finished'"]),
        ([0], ["a list, not an object"]),
    ],
)
def test_a_hand_edited_state_json_of_the_wrong_shape(data, tmp_path, state, words):
    run_dir = finished_run(tmp_path, data)
    with open(os.path.join(run_dir, "state.json"), "w") as f:
        json.dump(state, f)
    one_line(launcher_run(data, run_dir), "state.json", *words)


def test_a_truncated_window_record(data, tmp_path):
    run_dir = finished_run(tmp_path, data)
    record = os.path.join(run_dir, "periods", "0", "window.json")
    with open(record, "w") as f:
        f.write('{"window": 0, "finger')
    one_line(launcher_run(data, run_dir), record, "delete it")


def test_a_truncated_period_config(data, tmp_path):
    run_dir = finished_run(tmp_path, data)
    config = os.path.join(run_dir, "periods", "0", "config.json")
    truncate(config)
    one_line(train(data, run_dir), config, "period 0's config", "truncated")


def test_damaged_item_vectors_of_the_previous_period(data, tmp_path):
    run_dir = finished_run(tmp_path, data, vectors=True)
    vectors = os.path.join(run_dir, "periods", "0", "item_vectors.safetensors")
    truncate(vectors, keep=0.8)
    one_line(train(data, run_dir, "model.item_vectors=8"), vectors, "item vectors", "truncated")


def test_a_damaged_manifest_on_inspect_and_training(data, tmp_path):
    manifest = os.path.join(data, "manifest.json")
    truncate(manifest)
    one_line(run("-m", "data_tools", "inspect", data), manifest, "truncated", "--force")
    one_line(train(data, str(tmp_path / "run")), manifest, "truncated")
    with open(manifest, "w") as f:  # hand-edited into another shape
        json.dump({"schema_version": 2, "windows": {}, "counts": {}, "split": {}, "accounting": {}}, f)
    one_line(run("-m", "data_tools", "inspect", data), manifest, "'windows'")


def test_damaged_items_jsonl(data, tmp_path):
    items = os.path.join(data, "items.jsonl")
    with open(items, "ab") as f:
        f.write(b'{"item_id": 60, "sou')  # the last line cut short
    codes = tmp_path / "codes.json"
    codes.write_text("{}")
    one_line(run("-m", "data_tools", "index", data, "--import", str(codes), "--force"), items, "truncated")
    # a new run has no tokenizer yet: its first period reads the item texts to make one
    one_line(train(data, str(tmp_path / "run")), items, "cut short")


@pytest.fixture
def calendar(tmp_path) -> str:
    """A calendar dataset that `append --until` can grow (its last window held back)."""
    return small_stream(tmp_path, seed=4, split="calendar:60")


@pytest.mark.parametrize("name", ["users.jsonl", "items.jsonl", "pending.jsonl", "stream_state.npz"])
def test_damaged_files_kept_for_appends(calendar, name):
    path = os.path.join(calendar, name)
    truncate(path, keep=0.7)
    before = snapshot(calendar)
    one_line(run("-m", "data_tools", "append", calendar, "--until", "2030-01-01", "--no-progress"), path)
    assert snapshot(calendar) == before


def _report_run(tmp_path) -> str:
    from tests.unit.test_report import _window

    period = tmp_path / "run" / "periods" / "0"
    period.mkdir(parents=True)
    (period / "metrics.json").write_text(json.dumps({"period": 0, "method": "peso", "windows": {"0": _window(0.1)}}))
    (period / "train_summary.json").write_text(json.dumps({"period": 0, "steps": 2}))
    return str(tmp_path / "run")


def test_damaged_files_of_a_report(tmp_path):
    run_dir = _report_run(tmp_path)
    png = str(tmp_path / "report.png")
    assert run("-m", "launcher", "report", run_dir, "--png", png).returncode == 0
    metrics = os.path.join(run_dir, "periods", "0", "metrics.json")
    summary = os.path.join(run_dir, "periods", "0", "train_summary.json")
    truncate(summary)
    one_line(run("-m", "launcher", "report", run_dir, "--png", png), summary, "training summary", "truncated")
    os.remove(summary)
    doc = json.loads(open(metrics).read())
    doc["windows"]["0"]["overall"]["ndcg@10"] = "high"
    with open(metrics, "w") as f:
        json.dump(doc, f)
    one_line(run("-m", "launcher", "report", run_dir, "--png", png), metrics, "'ndcg@10'", "window 0")
    truncate(metrics)
    one_line(run("-m", "launcher", "report", run_dir, "--png", png), metrics, "truncated", "--eval_only")


def test_export_and_recommend_of_a_run_with_a_damaged_backbone(data, tmp_path):
    run_dir = finished_run(tmp_path, data)
    base = os.path.join(run_dir, "base")
    os.makedirs(base)
    with open(os.path.join(base, "config.json"), "w") as f:
        f.write('{"architectures": ["Llama')
    one_line(run("-m", "launcher", "export", run_dir, "--out", str(tmp_path / "x")), "base/config.json", "truncated")
    assert not os.path.exists(tmp_path / "x")
    proc = run("-m", "launcher", "recommend", run_dir, "--user", "u1", "--device", "cpu")
    one_line(proc, "base/config.json", "truncated")


# ---- checkpoints -----------------------------------------------------------------------------------


class _Engine:
    """Saves like DeepSpeed (files into <folder>/<tag>/) and says what it loaded."""

    def __init__(self):
        self.loaded = None

    def save_checkpoint(self, folder, tag, client_state, **kw):
        os.makedirs(os.path.join(folder, tag), exist_ok=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            with open(os.path.join(folder, tag, name), "wb") as f:
                f.write(json.dumps(client_state).encode() * 20)

    def load_checkpoint(self, folder, tag, **kw):
        self.loaded = tag
        return os.path.join(folder, tag), {}


def _one_rank():
    def agree(problem):
        if problem:
            raise AssertionError(problem)

    return SimpleNamespace(
        is_rank0=True,
        rank=0,
        world_size=1,
        barrier=lambda: None,
        broadcast_object=lambda obj: obj,
        gather_to_rank0=lambda obj: [obj],
        all_reduce_sum=list,
        agree=agree,
    )


@pytest.fixture
def checkpoints(tmp_path):
    """Three complete checkpoints (steps 1, 2, 3), all kept."""
    from train.dist.checkpoint import Checkpointer

    folder = str(tmp_path / "ds_ckpt")
    ckpt = Checkpointer(_one_rank(), folder, keep=3)
    for step in (1, 2, 3):
        ckpt.save(_Engine(), step, {"step": step})
    return folder


def _load(folder):
    from train.dist.checkpoint import Checkpointer

    engine = _Engine()
    return Checkpointer(_one_rank(), folder, keep=3).load(engine), engine.loaded


def test_a_whole_checkpoint_loads_the_newest(checkpoints):
    assert _load(checkpoints) == ({"step": 3}, "step-00000003")


@pytest.mark.parametrize("damage", ["truncate", "delete", "rng"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before_it(checkpoints, damage, caplog):
    tag = os.path.join(checkpoints, "step-00000003")
    if damage == "truncate":
        truncate(os.path.join(tag, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    elif damage == "delete":
        os.remove(os.path.join(tag, "mp_rank_00_model_states.pt"))
    else:
        truncate(os.path.join(tag, "rng-0.pt"), keep=0.3)
    with caplog.at_level(logging.WARNING, logger="train.dist.checkpoint"):
        assert _load(checkpoints) == ({"step": 2}, "step-00000002")
    assert "step-00000003" in caplog.text and "damaged" in caplog.text and "resuming from step-00000002" in caplog.text


@pytest.mark.parametrize("content", ["", '{"tag": "step-0000', '{"tag": 3}', "[]"])
def test_a_malformed_completion_mark_is_skipped_for_the_checkpoints_own_marks(checkpoints, content, caplog):
    with open(os.path.join(checkpoints, "COMPLETE.json"), "w") as f:
        f.write(content)
    with caplog.at_level(logging.WARNING, logger="train.dist.checkpoint"):
        assert _load(checkpoints) == ({"step": 3}, "step-00000003")  # its own mark says it is whole
    assert "COMPLETE.json" in caplog.text
    with open(os.path.join(checkpoints, "COMPLETE-step-00000003.json"), "w") as f:
        f.write(content)
    assert _load(checkpoints) == ({"step": 2}, "step-00000002")


def test_no_whole_checkpoint_left_starts_the_period_over_with_a_warning(checkpoints, caplog):
    for step in (1, 2, 3):
        os.remove(os.path.join(checkpoints, f"step-0000000{step}", "rng-0.pt"))
    with caplog.at_level(logging.WARNING, logger="train.dist.checkpoint"):
        assert _load(checkpoints) == (None, None)
    assert "trains from its start" in caplog.text


def test_a_checkpoint_of_another_number_of_ranks_is_one_line_not_a_damage(checkpoints):
    for name in os.listdir(checkpoints):
        if name.startswith("COMPLETE"):
            mark = read_json(os.path.join(checkpoints, name))
            with open(os.path.join(checkpoints, name), "w") as f:
                json.dump(dict(mark, world_size=2), f)
    with pytest.raises(AssertionError, match=r"written by 2 ranks and this run has 1.*--restart-period"):
        _load(checkpoints)  # the one-rank strategy's `agree` raises what all ranks would print once


def test_a_save_never_writes_into_the_checkpoint_it_resumed_from(checkpoints):
    """Resumed from step 2 (step 3 damaged), a save at step 2 goes beside it, and the folder it
    writes into loses its own mark first: a kill midway leaves no mark on a half-written tag."""
    from train.dist.checkpoint import Checkpointer, tag_mark

    truncate(os.path.join(checkpoints, "step-00000003", "rng-0.pt"))
    ckpt = Checkpointer(_one_rank(), checkpoints, keep=3)
    assert ckpt.load(_Engine()) == {"step": 2}
    assert ckpt._new_tag(2) == "step-00000002-again"
    assert ckpt._new_tag(1) == "step-00000001"  # an older tag is written into, without its mark
    assert not os.path.exists(os.path.join(checkpoints, tag_mark("step-00000001")))


# ---- the reading module --------------------------------------------------------------------------


def test_a_damaged_file_survives_pickling_and_a_dataloader_worker():
    e = DamagedFile("/d/x.json", "is empty", what="the thing", remedy="do this")
    assert str(e) == "the thing /d/x.json is empty; do this"
    assert str(pickle.loads(pickle.dumps(e))) == str(e)
    worker = (
        "Caught DamagedFile in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\ndata_tools.readback.DamagedFile: ' + str(e) + "\n"
    )
    assert str(DamagedFile(worker)) == str(e)


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", ["is empty"]),
        (b'{"a": 1, "b": [1, 2', ["is truncated"]),
        (b'{"a": 1,, "b": 2}', ["not valid JSON", "hand-edited"]),
        (b"\xff\xfe{}", ["not UTF-8"]),
        (b"[1, 2]", ["a list, not an object"]),
        (b'{"a": "1"}', ["a string as 'a', not an integer"]),
    ],
)
def test_read_json_names_what_is_wrong(tmp_path, content, words):
    path = tmp_path / "x.json"
    path.write_bytes(content)
    with pytest.raises(DamagedFile) as e:
        read_json(str(path), what="the x", remedy="fix it", fields={"a": int})
    for word in words:
        assert word in str(e.value)
    assert str(e.value).startswith(f"the x {path} ") and str(e.value).endswith("; fix it")
    assert read_json(str(tmp_path / "none.json"), missing=None) is None


def test_json_lines_cut_short_or_edited(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": 3}')
    with pytest.raises(DamagedFile, match=r"truncated: its last line \(3\) is cut short"):
        list(iter_jsonl(str(path)))
    path.write_bytes(b'{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(DamagedFile, match="at line 2"):
        list(iter_jsonl(str(path)))


def test_safetensors_headers_are_checked_against_the_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = str(tmp_path / "t.safetensors")
    save_file({"w": torch.ones(4, 4)}, path)
    assert set(check_safetensors(path)) == {"w"}
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DamagedFile, match="beyond its tensors"):
        check_safetensors(path)
    for keep in (0.9, 0.05, 0.0):
        save_file({"w": torch.ones(4, 4)}, path)
        truncate(path, keep)
        with pytest.raises(DamagedFile, match=r"truncated|empty|not a safetensors"):
            check_safetensors(path)


def test_shards_cut_short_anywhere_are_damaged(data):
    from data_tools.dataset import load_manifest
    from data_tools.reader import read_split
    from data_tools.shards import read_tar

    shard = os.path.join(data, "windows", "01", "test-000000.tar")
    with open(shard, "rb") as f:
        whole = f.read()
    samples = load_manifest(data)["windows"][1]["shards"]["test"][0]["samples"]
    assert len(list(read_tar(shard, samples))) == samples
    for cut in (len(whole) - 512, len(whole) - 1024, 1000, 512):
        with open(shard, "wb") as f:
            f.write(whole[:cut])
        with pytest.raises(DamagedFile, match="truncated") as e:
            list(read_tar(shard))
        assert shard in str(e.value) and "--force" in str(e.value)
        with pytest.raises(DamagedFile):
            read_split(data, 1, "test")
    with open(shard, "wb") as f:
        f.write(whole)
    with pytest.raises(DamagedFile, match=r"holds .* samples where the manifest says"):
        list(read_tar(shard, samples + 1))


def test_damaged_sequence_chunks_are_built_again(data, tmp_path, caplog):
    from data_tools.dataset import load_manifest
    from data_tools.sequences import CHUNKS, ChunkFile
    from train.loop.data import prepare_sequence_chunks

    rank0 = SimpleNamespace(is_rank0=True, agreeing=contextlib.nullcontext)
    folder, manifest = str(tmp_path / "chunks"), load_manifest(data)
    prepare_sequence_chunks(data, manifest, 0, 20, folder, rank0)
    whole = dict(ChunkFile(folder).fetch(range(len(ChunkFile(folder)))))
    truncate(os.path.join(folder, CHUNKS))
    with pytest.raises(DamagedFile, match="delete the folder"):
        ChunkFile(folder)
    with caplog.at_level(logging.WARNING, logger="train.loop.data"):
        prepare_sequence_chunks(data, manifest, 0, 20, folder, rank0)
    assert "built again" in caplog.text
    assert dict(ChunkFile(folder).fetch(range(len(ChunkFile(folder))))) == whole
