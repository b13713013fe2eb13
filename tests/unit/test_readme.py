"""The README and docs/ say what the code does.

- Every command in a fenced shell block (```bash, ```sh, ```shell; the `$ ` lines of ```console)
  of README.md and docs/*.md is checked against the code: `python -m data_tools ...`,
  `python -m launcher ...`, `python train/main.py ...` (also under `deepspeed`, `torchrun`,
  `python -m torch.distributed.run` and `srun`) and `python -m train.model.backbone ...` must parse
  with the real argparse parsers; a config they train with must load with its overrides, and its
  global batch must divide among the ranks the command starts; the repository files they name
  (configs/*.yaml, ds_configs/*.json, slurm/*.sh, bench/*.py, ...) must exist; `sbatch` must be
  given an existing script and known `PESO_*` settings; `make` targets must be in the Makefile.
  `[optional]` parts are checked as if given; a command with `...` may leave out required arguments.
- Every `section.key` named in backticks is a key of the configuration; every relative link
  resolves (and none leads into ../shared).
- docs/configuration.md is generated from the config dataclasses (train/common/config.py) and
  must match them: `python tests/unit/test_readme.py` rewrites it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import sys
import tempfile
import types
import typing
from dataclasses import dataclass, field
from unittest import mock

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DOC = os.path.join("docs", "configuration.md")
REGENERATE = "python tests/unit/test_readme.py"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# A repository file named in a command (not after a "/": /models/configs/x.yaml is not ours).
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:configs|ds_configs|slurm|bench|train|data_tools|launcher|tests)/[\w./-]+"
    r"\.(?:yaml|yml|json|sh|py))"
)
CONTROL = {"&&", "||", ";", "|", "&", "(", ")"}
REDIRECTS = {"<", ">", ">>", "<<", "<<<", ">&", "<&", ">|", "&>", "&>>"}
WRAPPERS = {"srun", "time", "env", "nohup", "exec"}


# --------------------------------------------------------------------------------------------
# docs/configuration.md, generated from the config dataclasses


SECTION_NOTES = {
    "model": "The backbone: a local Hugging Face folder or a named shape with random weights, its "
    "dtype, and what period 0 trains ([training.md](training.md)).",
    "lora": "The adapters (peft LoRA) that every LoRA period trains.",
    "method": "How one period's adapter carries over into the next ([methods.md](methods.md)).",
    "data": "The dataset, what one training sample is, the prompt, and each rank's batches.",
    "optim": "The optimizer (AdamW, unless the DeepSpeed config names one), clipping, and the stop "
    "after non-finite losses.",
    "schedule": "Epochs, batch sizes, warmup and early stopping, per period.",
    "checkpoint": "DeepSpeed checkpoints within a period (`periods/<t>/ds_ckpt/`, [folders.md](folders.md)).",
    "logging": "TensorBoard scalars and progress.",
    "eval": "The evaluation at the end of each period ([evaluation.md](evaluation.md)).",
}


def _type_text(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_text(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_text(typing.get_args(hint)[0])}"
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def configuration_markdown() -> str:
    """docs/configuration.md: every key of every section, its type, default, help, and whether it
    may change when a period resumes, read from the dataclasses of train/common/config.py."""
    from train.common.config import Config

    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the config dataclasses (train/common/config.py) by tests/unit/test_readme.py;",
        f"     do not edit by hand: `{REGENERATE}` rewrites it. -->",
        "",
        "An experiment is a YAML file of the sections below (`configs/*.yaml`: each opens with a comment",
        "showing the command that uses it); a key left out keeps its default. On the command line of",
        "`train/main.py` and `python -m launcher run`, and in `PESO_OVERRIDES` for `slurm/continual.sh`,",
        "dotted overrides `section.key=value` (a YAML value: `optim.lr=1e-4`, `eval.ks=[5,10]`,",
        "`model.path=null`) replace what the file says. Unknown keys, wrong types and impossible values",
        "are errors before any rank trains (exit code 2).",
        "`python train/main.py --print-config --config FILE [overrides]` prints the resolved",
        "configuration with the same help as below.",
        "",
        'Column "resume": a period that resumes from its checkpoint must have the configuration it',
        "started with, except the keys marked 'may change'; another change is an error naming the key",
        "(`--restart-period` trains the period again from its start instead).",
    ]
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        lines += ["", f"## `{section.name}`", ""]
        if section.name in SECTION_NOTES:
            lines += [SECTION_NOTES[section.name], ""]
        lines += ["| key | type | default | resume | help |", "| --- | --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            resume = "may change" if f.metadata.get("resume_may_change") else "fixed"
            lines.append(
                f"| `{section.name}.{f.name}` | {_cell(_type_text(hints[f.name]))} | "
                f"`{_cell(json.dumps(default))}` | {resume} | {_cell(f.metadata.get('help', ''))} |"
            )
    return "\n".join(lines) + "\n"


def test_configuration_doc_matches_the_config_dataclasses():
    with open(os.path.join(REPO, CONFIG_DOC)) as f:
        on_disk = f.read()
    assert on_disk == configuration_markdown(), (
        f"{CONFIG_DOC} is out of date with the config dataclasses in train/common/config.py "
        f"(a key, default or help changed): regenerate it with `{REGENERATE}` from the repository's top"
    )


def test_the_configuration_doc_lists_every_key():
    """The generator itself: every key, with its default and help, is in the text it writes."""
    text = configuration_markdown()
    for key, (default, help_text) in _config_keys().items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert f"`{_cell(json.dumps(default))}`" in row and _cell(help_text) in row


def _config_keys() -> dict[str, tuple[object, str]]:
    """section.key -> (its default, its help), from a default Config."""
    from train.common.config import Config

    cfg, keys = Config(), {}
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            keys[f"{section.name}.{f.name}"] = (getattr(values, f.name), f.metadata.get("help", ""))
    return keys


# --------------------------------------------------------------------------------------------
# Commands out of fenced shell blocks


@dataclass
class Command:
    where: str  # file:line
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    elided: bool = False  # the text leaves arguments out ("...")


@dataclass
class Block:
    where: str
    commands: list[Command]
    files: dict[str, str]  # repository paths the block writes (here-documents), with their text


def shell_blocks(text: str, source: str) -> list[Block]:
    """The fenced shell blocks of a markdown text, as simple commands."""
    blocks, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        marker, language, start = fence.group(2), fence.group(3).lower(), i + 1
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(marker):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        if language in SHELL_LANGUAGES:
            blocks.append(_parse_block(body, f"{source}:{start}", source, console=language == "console"))
    return blocks


def _parse_block(body: list[tuple[int, str]], where: str, source: str, console: bool) -> Block:
    if console:  # only the prompt lines (and their continuations) are commands
        kept, going_on = [], False
        for number, line in body:
            if line.startswith("$ ") or going_on:
                kept.append((number, line[2:] if line.startswith("$ ") else line))
                going_on = line.rstrip().endswith("\\")
        body = kept
    files, logical, pending, k = {}, [], None, 0
    while k < len(body):
        number, line = body[k]
        k += 1
        heredoc = re.search(r"<<-?\s*(['\"]?)(\w+)\1", line)
        if heredoc:
            target = re.search(r">\s*(\S+)", line[: heredoc.start()] + " " + line[heredoc.end() :])
            content = []
            while k < len(body) and body[k][1].strip() != heredoc.group(2):
                content.append(body[k][1])
                k += 1
            k += 1
            if target:
                files[os.path.normpath(target.group(1))] = "\n".join(content) + "\n"
            line = line[: heredoc.start()] + line[heredoc.end() :]
        if pending is None:
            pending = (number, line)
        else:
            pending = (pending[0], pending[1] + " " + line)
        if pending[1].rstrip().endswith("\\"):
            pending = (pending[0], pending[1].rstrip()[:-1])
            continue
        logical.append(pending)
        pending = None
    if pending is not None:
        logical.append(pending)
    commands = []
    for number, line in logical:
        commands += _simple_commands(line, f"{source}:{number}")
    return Block(where, commands, files)


def _unbracket(token: str) -> str:
    """`[--merged]`, `[--period` and `1]` of an optional part, but not `eval.ks=[5,10]`."""
    inner = token[1:-1]
    if token.startswith("[") and token.endswith("]") and not any(c in inner for c in "[],"):
        return inner
    while token.startswith("[") and token.count("[") > token.count("]"):
        token = token[1:]
    while token.endswith("]") and token.count("]") > token.count("["):
        token = token[:-1]
    return token


def _simple_commands(line: str, where: str) -> list[Command]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError as e:
        raise AssertionError(f"{where}: the shell cannot split this line ({e}): {line}") from None
    commands, current = [], []
    for token in tokens + [";"]:
        if token in CONTROL:
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    out = []
    for words in commands:
        kept, skip_next = [], False
        for token in words:  # redirections and their targets are no arguments
            if skip_next:
                skip_next = False
            elif token in REDIRECTS or re.fullmatch(r"\d[<>]+", token):
                skip_next = True
            else:
                kept.append(token)
        env = {}
        while kept and re.fullmatch(r"[A-Za-z_]\w*=.*", kept[0]):
            name, _, value = kept.pop(0).partition("=")
            env[name] = value
        argv = [_unbracket(t) for t in kept]
        elided = any(t == "..." for t in argv)
        argv = [t for t in argv if t and t != "..."]
        if argv:
            out.append(Command(where, argv, env, elided))
    return out


# --------------------------------------------------------------------------------------------
# Checking one command against the code


class _Parsed(Exception):
    """Raised in place of running a `main(argv)` once its arguments have parsed."""


def _parse(parse, argv: list[str], elided: bool) -> tuple[object | None, str | None]:
    """(the namespace, None) or (None, argparse's complaint)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parse(argv), None
    except SystemExit as e:
        if e.code in (0, None):
            return None, None
        message = stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else str(e)
        if elided and ("are required" in message or "is required" in message):
            return None, None
        return None, message


def _parse_with_main(module_name: str):
    """A parser for a module that builds its parser inside `main(argv)`: run main until it has
    parsed its arguments, then stop it."""
    module = importlib.import_module(module_name)
    original = argparse.ArgumentParser.parse_args

    def stop_after_parsing(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    def parse(argv):
        with mock.patch.object(argparse.ArgumentParser, "parse_args", stop_after_parsing):
            try:
                module.main(argv)
            except _Parsed as parsed:
                return parsed.args[0]
        raise AssertionError(f"{module_name}.main returned without parsing its arguments")

    return parse


def _entry_parsers() -> dict[str, object]:
    import data_tools.__main__ as data_main
    import launcher.__main__ as launcher_main
    import train.main as train_main

    return {
        "data_tools": lambda argv: data_main.build_parser().parse_args(argv),
        "launcher": lambda argv: launcher_main.build_parser().parse_args(argv),
        "train": train_main.parse_args,  # with its checks of --ds_config and --run
        "train.model.backbone": _parse_with_main("train.model.backbone"),
    }


def _makefile_targets() -> set[str]:
    targets = set()
    with open(os.path.join(REPO, "Makefile")) as f:
        for line in f:
            match = re.match(r"^([^\s#:=][^:=]*?)\s*::?(?![=])", line)
            if match and not line.startswith("\t"):
                targets.update(match.group(1).split())
    return targets


def _known_peso_settings() -> set[str]:
    names = set()
    for path in ["slurm/continual.sh", *glob.glob("launcher/**/*.py", root_dir=REPO, recursive=True)]:
        with open(os.path.join(REPO, path)) as f:
            names.update(re.findall(r"\bPESO_[A-Z_]+\b", f.read()))
    for path in glob.glob("train/**/*.py", root_dir=REPO, recursive=True):
        with open(os.path.join(REPO, path)) as f:
            names.update(re.findall(r"\bPESO_[A-Z_]+\b", f.read()))
    return names


def _sbatch_defaults() -> dict[str, str]:
    with open(os.path.join(REPO, "slurm", "continual.sh")) as f:
        return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", f.read(), flags=re.M))


def _option(argv: list[str], *names: str) -> str | None:
    """The value of an option written `--name value` or `--name=value` (the last one given)."""
    value = None
    for i, token in enumerate(argv):
        for name in names:
            if token == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif token.startswith(name + "="):
                value = token[len(name) + 1 :]
    return value


def _is_python(word: str) -> bool:
    return bool(re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(word)))


class Checker:
    """Checks the commands of markdown texts; `problems` names each that does not hold."""

    def __init__(self):
        self.parsers = _entry_parsers()
        self.targets = _makefile_targets()
        self.peso_settings = _known_peso_settings()
        self.problems: list[str] = []

    def check_markdown(self, text: str, source: str) -> list[str]:
        for block in shell_blocks(text, source):
            for command in block.commands:
                self.check_command(command, block.files)
        return self.problems

    def _problem(self, command: Command, message: str) -> None:
        self.problems.append(f"{command.where}: {message}\n    {shlex.join(command.argv)}")

    def _exists(self, path: str, files: dict[str, str]) -> bool:
        return os.path.normpath(path) in files or os.path.exists(os.path.join(REPO, path))

    def check_command(self, command: Command, files: dict[str, str]) -> None:
        for token in [*command.argv, *command.env.values()]:
            for path in REPO_PATH.findall(token):
                if not self._exists(path, files):
                    self._problem(command, f"{path} is not a file of the repository")
        argv = command.argv
        if argv[0] in WRAPPERS:  # srun [options] python ...: the command it runs
            inner = next(
                (i for i, t in enumerate(argv[1:], 1) if _is_python(t) or t in ("deepspeed", "torchrun")), None
            )
            if inner is None:
                return
            argv = argv[inner:]
        word = argv[0]
        if word == "make":
            for target in argv[1:]:
                if not target.startswith("-") and "=" not in target and target not in self.targets:
                    self._problem(command, f"make target {target!r} is not in the Makefile")
        elif word == "sbatch":
            self._check_sbatch(command, argv, files)
        elif word in ("deepspeed", "torchrun"):
            self._check_distributed(command, argv, files, word)
        elif word in ("peso-data", "peso-launch", "peso-train"):
            entry = {"peso-data": "data_tools", "peso-launch": "launcher", "peso-train": "train"}[word]
            self._check_entry(command, entry, argv[1:], files, world=1)
        elif _is_python(word):
            self._check_python(command, argv[1:], files)

    def _check_python(self, command: Command, args: list[str], files: dict[str, str]) -> None:
        options = []
        while args and args[0].startswith("-") and args[0] != "-m" and args[0] != "-c":
            options.append(args.pop(0))  # -u, -X ...
        if not args or args[0] == "-c":
            return
        if args[0] == "-m":
            if len(args) < 2:
                self._problem(command, "python -m without a module")
                return
            module, rest = args[1], args[2:]
            if module == "torch.distributed.run":
                self._check_distributed(command, ["torchrun", *rest], files, "torchrun")
            elif module in self.parsers:
                self._check_entry(command, module, rest, files, world=1)
            elif module.split(".")[0] in ("data_tools", "train", "launcher") and not importlib.util.find_spec(module):
                self._problem(command, f"no module {module}")
            return
        script = args[0]
        if os.path.normpath(script) == os.path.join("train", "main.py"):
            self._check_entry(command, "train", args[1:], files, world=1)

    def _check_distributed(self, command: Command, argv: list[str], files: dict[str, str], launcher: str) -> None:
        script = next((i for i, t in enumerate(argv) if t.endswith(".py")), None)
        if script is None:
            if not command.elided:
                self._problem(command, f"{launcher} is given no script")
            return
        before = argv[1:script]
        if launcher == "deepspeed":
            per_node, nodes = _option(before, "--num_gpus", "--num-gpus"), _option(before, "--num_nodes", "--num-nodes")
        else:
            per_node, nodes = _option(before, "--nproc_per_node", "--nproc-per-node"), _option(before, "--nnodes")
        world = None
        if per_node and per_node.isdigit():
            world = int(per_node) * (int(nodes) if nodes and nodes.isdigit() else 1)
        if os.path.normpath(argv[script]) == os.path.join("train", "main.py"):
            self._check_entry(command, "train", argv[script + 1 :], files, world=world)

    def _check_entry(self, command: Command, entry: str, args: list[str], files, world: int | None) -> None:
        namespace, error = _parse(self.parsers[entry], args, command.elided)
        if error:
            self._problem(command, f"{entry} does not take these arguments: {error}")
            return
        if namespace is None:
            return
        if entry == "train" and not namespace.print_config:
            self._check_config(command, namespace.config, namespace.overrides, files, world)
        elif entry == "train":
            self._check_config(command, namespace.config, namespace.overrides, files, None)
        elif entry == "launcher" and namespace.command == "run":
            self._check_config(command, namespace.config, namespace.overrides, files, namespace.nproc)

    def _check_sbatch(self, command: Command, argv: list[str], files: dict[str, str]) -> None:
        if _option(argv[1:], "--wrap") is not None:
            return  # a command line instead of a script
        # the script: a .sh file, else the last word that is no option (`-N 2` takes a value)
        script = next((i for i, t in enumerate(argv[1:], 1) if t.endswith(".sh")), None)
        if script is None:
            script = next((i for i in range(len(argv) - 1, 0, -1) if not argv[i].startswith("-")), None)
        if script is None:
            self._problem(command, "sbatch is given no script")
            return
        if not REPO_PATH.findall(argv[script]) and not self._exists(argv[script], files):  # else reported above
            self._problem(command, f"{argv[script]} is not a file of the repository")
        exported = dict(command.env)
        export = _option(argv[1:script], "--export")
        if export:
            exported.update(p.partition("=")[::2] for p in export.split(",") if "=" in p)
        for name in exported:
            if name.startswith("PESO_") and name not in self.peso_settings:
                self._problem(command, f"{name} is read by nothing (slurm/continual.sh, launcher/, train/)")
        if os.path.normpath(argv[script]) != os.path.join("slurm", "continual.sh"):
            return
        missing = [n for n in ("PESO_CONFIG", "PESO_DATA", "PESO_RUN") if n not in exported]
        if missing and not command.elided:
            self._problem(command, f"slurm/continual.sh needs {', '.join(missing)}")
        if "PESO_CONFIG" in exported:
            defaults = _sbatch_defaults()
            nodes = _option(argv[1:script], "--nodes", "-N") or defaults.get("nodes", "1")
            per_node = _option(argv[1:script], "--ntasks-per-node") or defaults.get("ntasks-per-node", "1")
            ntasks = _option(argv[1:script], "--ntasks", "-n")
            world = int(ntasks) if ntasks and ntasks.isdigit() else None
            if world is None and nodes.isdigit() and per_node.isdigit():
                world = int(nodes) * int(per_node)
            overrides = exported.get("PESO_OVERRIDES", "").split()
            self._check_config(command, exported["PESO_CONFIG"], overrides, files, world)

    def _check_config(self, command: Command, path: str | None, overrides, files, world: int | None) -> None:
        """The config loads with the overrides, and its batch divides among `world` ranks."""
        from train.common.config import ConfigError, accumulation_steps, load_config

        if not path or not self._exists(path, files):
            return  # a placeholder (X.yaml), or a missing repository file (reported above)
        key = os.path.normpath(path)
        with tempfile.TemporaryDirectory() as tmp:
            if key in files:
                real = os.path.join(tmp, os.path.basename(key))
                with open(real, "w") as f:
                    f.write(files[key])
            else:
                real = os.path.join(REPO, path)
            try:
                cfg = load_config(real, list(overrides))
                if world:
                    accumulation_steps(cfg, world)
            except ConfigError as e:
                self._problem(command, f"{path}: {e}")


# --------------------------------------------------------------------------------------------
# The tests


def _documents() -> list[str]:
    return ["README.md", *sorted(glob.glob("docs/*.md", root_dir=REPO)), "bench/RESULTS.md"]


def _read(path: str) -> str:
    with open(os.path.join(REPO, path)) as f:
        return f.read()


@pytest.fixture(scope="module")
def checker() -> Checker:
    return Checker()


@pytest.mark.parametrize("document", _documents())
def test_documented_commands_run_as_written(checker, document):
    checker.problems = []
    problems = checker.check_markdown(_read(document), document)
    assert not problems, "commands that the code does not take:\n" + "\n".join(problems)


def test_the_readme_has_commands_of_every_entry_point():
    """The README's walkthrough reaches each entry point (so the check above has something to check)."""
    commands = [c for b in shell_blocks(_read("README.md"), "README.md") for c in b.commands]
    text = [shlex.join(c.argv) for c in commands]
    for needle in ("-m data_tools convert", "-m data_tools index", "-m launcher recommend", "-m launcher export"):
        assert any(needle in t for t in text), f"README: no command with {needle}"
    assert any(c.argv[0] == "sbatch" and "slurm/continual.sh" in c.argv for c in commands)
    assert any("train/main.py" in c.argv for c in commands)


def test_the_two_commands_come_first():
    """`make demo` and `make test` open the README (CI runs `make test`)."""
    first = shell_blocks(_read("README.md"), "README.md")[0]
    assert [c.argv for c in first.commands] == [["make", "demo"], ["make", "test"]]


@pytest.mark.parametrize(
    "snippet, complaint",
    [
        ("python -m data_tools convert --format amazon2023 --reviews r.jsonl --out d --no-such-flag", "unrecognized"),
        ("python -m data_tools convert --format amazon2099 --reviews r.jsonl --out d", "invalid choice"),
        ("python -m data_tools index data/x --embedder gpt:thing", "--embedder"),
        ("python -m launcher recommend runs/x --user 1 --k ten", "invalid int"),
        ("python -m launcher export runs/x", "required"),
        ("python -m launcher run --config configs/tiny.yaml --data d --run r --nproc 2 optim.lrr=1", "optim.lrr"),
        ("python -m launcher run --config configs/tiny.yaml --data d --run r --nproc 3", "multiple"),
        ("deepspeed --num_gpus 2 train/main.py --config configs/tiny.yaml --data d --run r", "--ds_config"),
        (
            "torchrun --nproc_per_node 2 train/main.py --ds_config ds_configs/zero4.json --config configs/tiny.yaml --run r",
            "zero4",
        ),
        ("python train/main.py --print-config --config configs/nope.yaml", "configs/nope.yaml"),
        ("python -m train.model.backbone convert-gguf smollm2", "--out"),
        (
            "PESO_CONFIG=configs/paper.yaml PESO_DATA=d PESO_RUN=r PESO_NODES=1 sbatch -N 1 --ntasks-per-node=4 slurm/continual.sh",
            "PESO_NODES",
        ),
        ("PESO_CONFIG=configs/paper.yaml PESO_DATA=d PESO_RUN=r sbatch slurm/continual.sh", "multiple"),
        (
            "PESO_CONFIG=configs/paper.yaml PESO_RUN=r sbatch --nodes=1 --ntasks-per-node=4 slurm/continual.sh",
            "PESO_DATA",
        ),
        ("PESO_CONFIG=configs/tiny.yaml PESO_DATA=d PESO_RUN=r sbatch slurm/chain.sh", "slurm/chain.sh"),
        ("make demo tests", "'tests'"),
        ("srun --gpus=1 python -m data_tools index data/x --levles 4", "--levles"),
    ],
)
def test_the_checker_catches_a_bad_command(checker, snippet, complaint):
    """A README that says something the code does not take fails the test, naming it."""
    checker.problems = []
    problems = checker.check_markdown(f"Text.\n\n```bash\n{snippet}\n```\n", "README.md")
    assert len(problems) == 1 and complaint in problems[0], problems


def test_the_checker_reads_blocks_as_a_shell_does(checker):
    """Continuations, here-documents (a config written in the block is loaded from there),
    comments, optional parts and `...`; the checked copy of the README passes, a bad flag in it fails."""
    good = """```bash
cat > configs/mine.yaml <<'EOF'
model: {path: /models/Llama-3.2-1B}
data: {micro_batch_size: 4}
schedule: {global_batch_size: 64}
EOF
PESO_CONFIG=configs/mine.yaml PESO_DATA=data/x PESO_RUN=runs/x \\
    sbatch --nodes=2 --ntasks-per-node=8 slurm/continual.sh   # 16 ranks x 4 = 64
python -m launcher recommend runs/x --user ID [ID ...] [--period 4] [--k 10]
python train/main.py ...                # one process
```
```console
$ python -m launcher export demo/runs/peso --out demo/export/peso --merged
period 4 (peso) exported to demo/export/peso (merged) --not-a-command
```
"""
    checker.problems = []
    assert checker.check_markdown(good, "good.md") == []
    readme = _read("README.md")
    assert checker.check_markdown(readme, "README.md") == []
    bad = readme.replace("python -m launcher recommend", "python -m launcher recommend --top 3", 1)
    assert bad != readme
    problems = checker.check_markdown(bad, "README.md")
    assert len(problems) == 1 and "--top" in problems[0], problems
    wrong = good.replace("micro_batch_size: 4", "micro_batch_size: 8")
    checker.problems = []
    problems = checker.check_markdown(wrong, "wrong.md")
    assert len(problems) == 1 and "global_batch_size" in problems[0], problems


# --------------------------------------------------------------------------------------------
# Config keys and links named in the text


CONFIG_KEY = re.compile(
    r"`((?:model|lora|method|data|optim|schedule|checkpoint|logging|eval)"
    r"\.(?!(?:py|md|json|jsonl|yaml|yml|sh|txt|safetensors)`)[a-z_0-9]+)(?=[`:= ])"
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def unknown_config_keys(text: str) -> list[str]:
    return sorted(set(CONFIG_KEY.findall(text)) - set(_config_keys()))


def broken_links(text: str, document: str) -> list[str]:
    """Relative links that lead to nothing, or into shared/ (no document may cite it)."""
    broken = []
    for target in LINK.findall(text):
        path = target.split("#", 1)[0]
        if not path or re.match(r"^[a-z][a-z0-9+.-]*:", path):
            continue
        if "shared/" in path or not os.path.exists(os.path.join(REPO, os.path.dirname(document), path)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("document", _documents())
def test_named_config_keys_exist(document):
    unknown = unknown_config_keys(_read(document))
    assert not unknown, f"{document} names config keys that do not exist: {unknown}"


@pytest.mark.parametrize("document", _documents())
def test_relative_links_resolve(document):
    broken = broken_links(_read(document), document)
    assert not broken, f"{document}: links to nothing (or into shared/): {broken}"


def test_the_key_and_link_checks_can_fail():
    assert unknown_config_keys("`method.lam: 2`, `method.lamda: 2`, `optim.lr=1e-4`, `data.py`") == ["method.lamda"]
    text = "[a](docs/slurm.md#the-chain) [b](docs/nothing.md) [c](https://x.org/y) [d](../shared/data/README.md)"
    assert broken_links(text, "README.md") == ["docs/nothing.md", "../shared/data/README.md"]


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    with open(os.path.join(REPO, CONFIG_DOC), "w") as out:
        out.write(configuration_markdown())
    print(f"wrote {CONFIG_DOC}")
