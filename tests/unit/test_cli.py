"""The command lines: every option explained with its default, fixed sets of values as choices,
no silent default experiment, and exit codes that say what happened."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

import launcher.periods as periods
from data_tools.__main__ import build_parser as data_tools_parser
from data_tools.help_format import HelpFormatter
from launcher.__main__ import build_parser as launcher_parser
from launcher.__main__ import main as launcher_main
from train.common.exit_codes import EXIT_REQUEUE
from train.main import build_parser as train_parser
from train.main import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def _options_not_explained(parser: argparse.ArgumentParser) -> list[str]:
    """Options of `parser` and its subcommands without a help text, or whose help does not show
    the default (a switch needs none; a required option has none)."""
    required_groups = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            problems += [f"{name} {p}" for name, sub in action.choices.items() for p in _options_not_explained(sub)]
            continue
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = "/".join(action.option_strings) or action.dest
        shown = HelpFormatter(parser.prog)._get_help_string(action)
        if not action.help:
            problems.append(f"{name}: no help")
        elif (
            action.option_strings
            and action.nargs != 0
            and not action.required
            and id(action) not in required_groups
            and "default" not in shown
        ):
            problems.append(f"{name}: the default is not shown")
    return problems


@pytest.mark.parametrize(
    "parser", [data_tools_parser, launcher_parser, train_parser], ids=["data_tools", "launcher", "train"]
)
def test_every_option_has_help_and_shows_its_default(parser):
    assert _options_not_explained(parser()) == []


def test_the_formatter_shows_defaults_but_not_none_or_switches():
    help_text = " ".join(launcher_parser()._subparsers._group_actions[0].choices["run"].format_help().split())
    assert "ranks on this machine (GPUs, or CPU processes) (default: 1)" in help_text
    assert "None" not in help_text and "False" not in help_text


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["convert", "--format", "amazon2099", "--reviews", "r", "--out", "o"],
            "argument --format: invalid choice: 'amazon2099'",
        ),
        (["index", "d", "--embedder", "bert"], "'bert' is not one of minilm, hf:PATH, npy:PATH"),
        (["index", "d", "--collisions", "merge"], "argument --collisions: invalid choice"),
    ],
)
def test_data_tools_options_with_fixed_values_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        data_tools_parser().parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_report_metric_is_checked(capsys):
    assert launcher_parser().parse_args(["report", "r", "--metric", "hit@20"]).metric == "hit@20"
    with pytest.raises(SystemExit):
        launcher_parser().parse_args(["report", "r", "--metric", "ndcg"])
    assert "'ndcg' is not one of hit@K, ndcg@K, test_loss" in capsys.readouterr().err


def test_launcher_run_without_config_is_an_error_not_the_tiny_experiment(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "run", "--data", str(tmp_path / "d"), "--run", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "the following arguments are required: --config" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_launcher_run_checks_the_config_before_any_period(tmp_path, capsys):
    code = launcher_main(
        ["run", "--config", TINY, "--data", str(tmp_path / "d"), "--run", str(tmp_path / "r"), "eval.ks=[a]"]
    )
    assert code == 2 and "error: eval.ks[0]: expected an integer, got 'a'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "raised,code", [(periods.PeriodInterrupted(1), EXIT_REQUEUE), (periods.PeriodFailed(1, 134), 1)]
)
def test_launcher_run_exit_code_says_how_the_periods_ended(raised, code, tmp_path, monkeypatch, capsys):
    def run_local(*args, **kwargs):
        raise raised

    monkeypatch.setattr(periods, "run_local", run_local)
    assert launcher_main(["run", "--config", TINY, "--data", str(tmp_path), "--run", str(tmp_path / "r")]) == code
    assert str(raised) in capsys.readouterr().err


def test_slurm_job_without_a_config_stops_at_once_naming_the_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PESO_", "SLURM_"))}
    env.update(
        PESO_REPO=REPO,
        PESO_PYTHON=sys.executable,
        PESO_DATA=str(tmp_path / "d"),
        PESO_RUN=str(tmp_path / "r"),
        PYTHONPATH=REPO,
    )
    proc = subprocess.run(
        ["bash", os.path.join(REPO, "slurm", "continual.sh")],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: set PESO_CONFIG (see the header of slurm/continual.sh)" in proc.stderr


def test_print_config_needs_no_run_and_reports_config_errors(capsys):
    assert train_main(["--print-config", "--config", TINY, "--data", "/data/x", "optim.lr=1e-4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["key", "type", "value", "default", "help"]
    assert any(line.split()[:4] == ["optim.lr", "float", "0.0001", "0.0002"] for line in out)
    assert any(line.split()[:3] == ["data.path", "str", "|"] and '"/data/x"' in line for line in out)
    assert train_main(["--print-config", "--config", TINY, "lora.targets=[]"]) == 2
    assert "error: lora.targets: expected a non-empty list, got []" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_main(["--config", TINY])
    assert e.value.code == 2 and "required: --ds_config, --run" in capsys.readouterr().err


# ---- run_local: what a period's exit says, with stand-ins for train/main.py -----------------------


def _fake_periods(monkeypatch, tmp_path, script: str) -> list[list[str]]:
    """Periods 0 and 1 remain; each "period" runs `script` (with the run folder as argv[1]).
    Returns the list that collects the arguments each period was given."""
    given = []
    monkeypatch.setattr(periods, "remaining_periods", lambda data, run, restart=False: [0, 1])

    def command(nproc, args):
        given.append(args)
        return [sys.executable, "-c", script, str(tmp_path)]

    monkeypatch.setattr(periods, "local_command", command)
    return given


def _run_local(tmp_path, restart=False):
    settings = periods.RunSettings("c.yaml", "data", str(tmp_path), "ds.json")
    return periods.run_local(settings, 2, log=open(os.devnull, "w"), restart=restart)


def test_run_local_sees_a_checkpoint_on_a_signal_behind_torchruns_exit_code(tmp_path, monkeypatch):
    """torchrun exits 1 when its workers exit 75: state.json, written since the period started, tells."""
    _fake_periods(
        monkeypatch,
        tmp_path,
        "import json, os, sys; json.dump({'done': [], 'period': 0, 'phase': 'stopped'}, "
        "open(os.path.join(sys.argv[1], 'state.json'), 'w')); sys.exit(1)",
    )
    with pytest.raises(periods.PeriodInterrupted, match="period 0 stopped on a signal"):
        _run_local(tmp_path)


def test_run_local_stale_stopped_state_is_a_failure(tmp_path, monkeypatch):
    """A run stopped earlier, then a rerun that fails before it writes anything: a failure."""
    with open(tmp_path / "state.json", "w") as f:
        json.dump({"done": [], "period": 0, "phase": "stopped"}, f)
    os.utime(tmp_path / "state.json", (0, 0))
    _fake_periods(monkeypatch, tmp_path, "import sys; sys.exit(2)")
    with pytest.raises(periods.PeriodFailed, match=r"period 0 failed \(exit code 2\)"):
        _run_local(tmp_path)


def test_run_local_exit_75_is_an_interruption_and_restart_goes_to_the_first_period_only(tmp_path, monkeypatch):
    given = _fake_periods(monkeypatch, tmp_path, f"import sys; sys.exit({EXIT_REQUEUE})")
    with pytest.raises(periods.PeriodInterrupted):
        _run_local(tmp_path)
    given = _fake_periods(monkeypatch, tmp_path, "pass")
    assert _run_local(tmp_path, restart=True) == [0, 1]
    assert ["--restart-period" in args for args in given] == [True, False]
