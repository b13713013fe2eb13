"""The distribution works outside a checkout: its commands exist, every package is in it, and the
configs, DeepSpeed configs and SLURM script it ships are found where a wheel puts them."""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import shutil
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize(
    "command, target",
    [
        ("peso-data", "data_tools.__main__:main"),
        ("peso-train", "train.main:console_main"),
        ("peso-launch", "launcher.__main__:main"),
    ],
)
def test_console_scripts_name_functions_that_exist(pyproject, command, target):
    assert pyproject["project"]["scripts"][command] == target
    module, _, name = target.partition(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_every_package_of_the_checkout_is_listed(pyproject):
    """The list is explicit (launcher.shipped is no folder), so a new subpackage must be added to it."""
    on_disk = {
        os.path.dirname(os.path.relpath(p, REPO)).replace(os.sep, ".")
        for top in ("data_tools", "train", "launcher")
        for p in glob.glob(os.path.join(REPO, top, "**", "__init__.py"), recursive=True)
    }
    assert set(pyproject["tool"]["setuptools"]["packages"]) == on_disk | {"launcher.shipped"}


def _install_like_a_wheel(pyproject: dict, site: str) -> None:
    """Lay out launcher/ as pip installs the wheel: the package, and under launcher/shipped/ the
    files that pyproject.toml's package data selects from the checkout's top."""
    shutil.copytree(os.path.join(REPO, "launcher"), os.path.join(site, "launcher"))
    top = os.path.join(REPO, pyproject["tool"]["setuptools"]["package-dir"]["launcher.shipped"])
    for pattern in pyproject["tool"]["setuptools"]["package-data"]["launcher.shipped"]:
        for path in glob.glob(os.path.join(top, pattern)):
            dest = os.path.join(site, "launcher", "shipped", os.path.relpath(path, top))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy(path, dest)


def _load_files_module(path: str):
    spec = importlib.util.spec_from_file_location("installed_launcher_files", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "parts",
    [
        ("configs", "tiny.yaml"),
        ("configs", "demo.yaml"),
        ("ds_configs", "zero2.json"),
        ("ds_configs", "zero3.json"),
        ("ds_configs", "zero3_offload.json"),
        ("slurm", "continual.sh"),
    ],
)
def test_shipped_files_are_found_in_a_checkout_and_in_an_installed_wheel(pyproject, tmp_path, parts):
    from launcher.files import shipped

    assert shipped(*parts) == os.path.join(REPO, *parts)
    _install_like_a_wheel(pyproject, str(tmp_path))
    installed = _load_files_module(str(tmp_path / "launcher" / "files.py"))
    assert installed.shipped(*parts) == str(tmp_path.joinpath("launcher", "shipped", *parts))
    assert os.path.isfile(installed.shipped(*parts))
