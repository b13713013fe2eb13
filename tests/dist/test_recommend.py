"""Recommendations out of a run: exports that reproduce the evaluation in a fresh process without
DeepSpeed (each method, adapter and merged), the `recommend` command, and its errors.

Runs on 2 ranks under really partitioned ZeRO-3: period 0 (full) and period 1, then period 2
with each method, evaluated on a seeded sample of test users. peso and cumulative run with item
vectors (model.item_vectors), single without, so both kinds of model are served."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.dist.conftest import QUICK, REPO, launcher, probe_export, train

CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
METHODS = {"peso": True, "single": False, "cumulative": True}  # method -> with item vectors
USERS = 40  # eval.max_users: the sample of each window's test users
VECTORS = "model.item_vectors=16"


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, cds_data, ds_configs) -> dict[str, str]:
    flags = ["--ds_config", ds_configs[3], "--config", CONFIG, "--data", cds_data]
    common = [*QUICK, f"eval.max_users={USERS}"]
    bases = {}
    for vectors in (False, True):
        bases[vectors] = base = str(tmp_path_factory.mktemp("rec") / "base")
        extra = [VECTORS] if vectors else []
        train(2, [*flags, "--run_dir", base, *common, *extra, "schedule.max_steps=30"])  # period 0, in full
        train(2, [*flags, "--run_dir", base, *common, *extra, "schedule.max_steps=6"])  # period 1: the first adapter
    common.append("eval.every_period=true")
    runs = {}
    for method, vectors in METHODS.items():  # period 2: cumulative adds period 1's adapter, frozen, to the forward
        runs[method] = str(tmp_path_factory.mktemp(method) / "run")
        shutil.copytree(bases[vectors], runs[method])
        extra = [VECTORS] if vectors else []
        train(2, [*flags, "--run_dir", runs[method], *common, *extra, "schedule.max_steps=6", f"method.name={method}"])
    return runs


def evaluation_of(run: str, period: int) -> tuple[dict, list[dict]]:
    with open(os.path.join(run, "periods", str(period), "metrics.json")) as f:
        metrics = json.load(f)["windows"][str(period)]["overall"]
    with open(os.path.join(run, "periods", str(period), "recommendations.jsonl")) as f:
        lists = [json.loads(line) for line in f]
    return metrics, lists


@pytest.mark.parametrize(
    "method,merged", [("peso", False), ("single", True), ("cumulative", False), ("cumulative", True)]
)
def test_export_reproduces_the_evaluation_in_a_fresh_process(method_runs, cds_data, tmp_path, method, merged):
    run = method_runs[method]
    out = str(tmp_path / "export")
    # merged: loaded and merged with accelerate's device_map over the devices there are (--device auto)
    proc = launcher("export", run, "--period", "2", "--out", out, *(["--merged", "--device", "auto"] if merged else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "recommender.json")) as f:
        info = json.load(f)
    assert info["kind"] == ("merged" if merged else "adapter") and info["method"] == method and info["period"] == 2
    assert os.path.isfile(os.path.join(out, "item_vectors.safetensors")) == METHODS[method]
    if merged:
        assert os.path.isfile(os.path.join(out, "config.json")) and not os.path.exists(os.path.join(out, "adapter"))
    else:
        with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
            r = json.load(f)["r"]
        assert r == (16 if method == "cumulative" else 8)  # the frozen sum folded in as extra rank
    result = probe_export(out, cds_data, 2, USERS, tmp_path)
    assert not result["deepspeed_imported"]
    metrics, lists = evaluation_of(run, 2)
    assert len(lists) == USERS and all(len(x["items"]) == 20 for x in lists)
    for x, y in zip(lists, result["lists"]):
        assert (x["user"], x["target"], x["rank"], x["items"]) == (y["user"], y["target"], y["rank"], y["items"])
        assert max(abs(a - b) for a, b in zip(x["scores"], y["scores"])) < 1e-4
    for key, value in metrics.items():
        if key.startswith(("hit@", "ndcg@")):
            assert result["metrics"][key] == pytest.approx(value, abs=1e-9), key
    if merged:  # Hugging Face generate + TrieLogitsProcessor on the plain folder: the same first item
        first = {x["user"]: x["items"][0] for x in lists}
        assert result["generate_top"] and all(g["item"] == first[g["user"]] for g in result["generate_top"])


def test_methods_differ_so_the_comparison_can_fail(method_runs):
    """The exports above would all pass if the three methods gave one model: they do not."""
    scores = {m: [x["scores"][0] for x in evaluation_of(run, 2)[1]] for m, run in method_runs.items()}
    assert scores["cumulative"] != scores["single"]


def test_recommend_command_answers_like_the_evaluation(method_runs, cds_data, tmp_path):
    from data_tools.dataset import load_manifest
    from train.evaluation.users import test_users

    run = method_runs["cumulative"]
    _, lists = evaluation_of(run, 2)
    first = {x["user"]: x["items"][0] for x in lists}
    users = {u["user"]: u for u in test_users(cds_data, load_manifest(cds_data), 2, USERS, 0)}
    source_item = {}
    with open(os.path.join(cds_data, "items.jsonl")) as f:
        for row in map(json.loads, f):
            source_item[row["item_id"]] = row["source_id"]
    source_user = {}
    with open(os.path.join(cds_data, "users.jsonl")) as f:
        for row in map(json.loads, f):
            source_user[row["user_id"]] = row["source_id"]
    chosen = sorted(users)[:3]
    args = []
    for u in chosen:  # the test users' histories, as source ids: the evaluation's prompts
        args += ["--history", ",".join(source_item[i] for i in users[u]["history"])]
    out = str(tmp_path / "recs.jsonl")
    # --device auto: accelerate places the model over the devices there are (here the CPU alone)
    proc = launcher("recommend", run, "--period", "2", *args, "--k", "5", "--out", out, "--device", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        answers = [json.loads(line) for line in f]
    assert len(answers) == 3 and all(len(a["recommendations"]) == 5 and a["period"] == 2 for a in answers)
    for u, a in zip(chosen, answers):
        assert a["recommendations"][0]["item"] == source_item[first[u]]
        scores = [r["score"] for r in a["recommendations"]]
        assert scores == sorted(scores, reverse=True)

    # Users by source id (their items up to the end of period 2), one unknown: named, the rest answered.
    users_file = tmp_path / "users.txt"
    users_file.write_text("\n".join([source_user[chosen[0]], "no-such-user", source_user[chosen[1]]]) + "\n")
    proc = launcher("recommend", run, "--users", str(users_file), "--out", out)
    assert proc.returncode == 1 and "'no-such-user'" in proc.stderr, proc.stderr[-2000:]
    with open(out) as f:
        answers = [json.loads(line) for line in f]
    assert [a["user"] for a in answers] == [source_user[chosen[0]], source_user[chosen[1]]]
    # the history now ends with the test item (the period is over), so it is one item longer
    assert answers[0]["history_length"] == min(len(users[chosen[0]]["history"]) + 1, 21)

    history = [source_item[i] for i in users[chosen[0]]["history"]]
    proc = launcher("recommend", run, "--history", ",".join(history), "--k", "5", "--exclude-seen", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as f:
        (answer,) = [json.loads(line) for line in f]
    assert len(answer["recommendations"]) == 5 and not {r["item"] for r in answer["recommendations"]} & set(history)

    proc = launcher("recommend", run, "--history", "no-such-item," + source_item[users[chosen[0]]["target"]])
    assert proc.returncode == 2 and "'no-such-item'" in proc.stderr
    proc = launcher("recommend", run, "--period", "7", "--user", source_user[chosen[0]])
    assert proc.returncode == 2 and "period 7" in proc.stderr
