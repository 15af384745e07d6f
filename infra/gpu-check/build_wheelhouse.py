"""Builds the offline bundle that `make gpu-check` carries to an air-gapped GPU node.

The node (the hardest case we design for): CPython 3.12, Linux x86_64, torch with CUDA, transformers 5.x,
numpy, safetensors and pyyaml installed with their own dependencies; no package index; at most 64 MiB
brought along. The bundle holds exactly the wheels that node lacks, a `run.sh` that installs them offline
and runs the check script, and a `manifest.json`.

    .venv/bin/python infra/gpu-check/build_wheelhouse.py [--out DIR]   # build (cached downloads)
    .venv/bin/python infra/gpu-check/build_wheelhouse.py --check        # closure check of DIR/wheels

Only stdlib, `packaging` and pip. pip never resolves here (`--no-deps` everywhere, so it can never pull
torch or CUDA libraries): the closure is computed from the wheels' own `Requires-Dist`, with markers
evaluated for the node rather than for this interpreter.
"""

from __future__ import annotations

import argparse
import datetime
import email.parser
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from packaging import tags
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "build" / "gpu-check"
CACHE = ROOT / ".cache" / "gpu-check" / "wheels"  # downloads and the built deepspeed wheel: 2nd build offline
LIMIT_BYTES = 64 * 2**20

# The node's interpreter and platform: every marker and wheel tag is judged for it, not for this Python.
NODE_PYTHON = (3, 12)
NODE_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
# Highest glibc first (pip's own preference order). 2.28 is the ceiling because CUDA torch wheels are
# manylinux_2_28 themselves, so any node that runs torch has at least that glibc.
NODE_PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]
NODE_TAGS = set(tags.cpython_tags(NODE_PYTHON, abis=["cp312"], platforms=NODE_PLATFORMS)) | set(
    tags.compatible_tags(NODE_PYTHON, "cp312", NODE_PLATFORMS)
)

# What the node is assumed to have already, so never shipped: torch, transformers 5.x, numpy, safetensors,
# pyyaml and what pip installed with them. Taken from this venv's metadata: the non-extra Requires-Dist
# closure of those five (`importlib.metadata.requires("transformers")`, `...("torch")`, recursively), which
# `node_assumption_drift()` re-derives on every build and warns about when it changes. transformers 5.x
# brings huggingface-hub >= 1.0 (5.24: >= 1.31; diffusers 0.42 wants >= 1.32, checked against this venv's).
# Deliberately absent, although this venv's typer pulls it in: pydantic and its own dependencies (older
# typer releases do not need it, and the node we design for has none), so those are shipped. torch's CUDA
# build also brings triton and the nvidia-*-cuXX libraries (absent from the CPU build's metadata here),
# matched by NODE_CUDA_LIBS.
NODE_PACKAGES = frozenset(
    {
        # the five roots
        "torch", "transformers", "numpy", "safetensors", "pyyaml",
        # torch's own
        "filelock", "typing-extensions", "setuptools", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
        "fsspec", "triton",
        # transformers 5.x's own (huggingface-hub pulls click, httpx2 and hf-xet; typer pulls rich)
        "huggingface-hub", "packaging", "regex", "tokenizers", "typer", "tqdm", "click", "hf-xet", "httpx2",
        "httpcore2", "h11", "anyio", "idna", "truststore", "shellingham", "rich", "markdown-it-py", "mdurl",
        "pygments", "annotated-doc",
    }
)  # fmt: skip
NODE_ROOTS = ("torch", "transformers", "numpy", "safetensors", "pyyaml")
NODE_CUDA_LIBS = re.compile(r"nvidia-.+-cu\d+")

# What the node lacks and the check imports: motus.config (pydantic, pydantic-settings), motus.model
# (diffusers; Pillow through it, which the VLM's image processor uses too) and motus.train (deepspeed).
# PyAV is NOT shipped (34 MiB): the check's tiers are npz, and motus/data/video.py imports PyAV only for mp4.
# Versions are this venv's, the combination the tests ran.
SHIP = ("diffusers", "deepspeed", "pydantic", "pydantic-settings")
# PyPI has only an sdist of deepspeed: built here into a pure wheel, with no CUDA op compiled (DS_BUILD_OPS=0)
# and DS_ACCELERATOR=cuda, so its metadata is what a CUDA node would get (it then adds nvidia-ml-py).
FROM_SDIST = {"deepspeed": {"DS_BUILD_OPS": "0", "DS_ACCELERATOR": "cuda"}}
PROJECT = "motus"  # installed with --no-deps: the list above is what the check needs of its dependencies
EXTRA_FILES = ("benchmarks/gpu_check.py", "benchmarks/mot_flops.py")


class BuildError(Exception):
    """A build step failed; the message says which and why."""


def on_node(name: str) -> bool:
    name = canonicalize_name(name)
    return name in NODE_PACKAGES or bool(NODE_CUDA_LIBS.fullmatch(name))


def venv_version(name: str) -> Version | None:
    try:
        return Version(importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        return None


def node_assumption_drift() -> list[str]:
    """Packages this venv's copies of the node roots need (for the node) that NODE_PACKAGES does not list."""
    seen, todo = set(), list(NODE_ROOTS)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [r.name for r in map(Requirement, reqs) if not r.marker or r.marker.evaluate(NODE_MARKERS)]
    # pydantic and its own dependencies: on the node only through a recent typer, shipped (see NODE_PACKAGES)
    shipped = {canonicalize_name(n) for n in SHIP} | {"pydantic-core", "annotated-types", "typing-inspection"}
    return sorted(n for n in seen if not on_node(n) and n not in shipped)


# ------------------------------------------------------------------------------------------------ wheels
def wheel_name_version(path: Path) -> tuple[str, Version]:
    name, version, _, _ = parse_wheel_filename(path.name)
    return name, version


def wheel_fits_node(path: Path) -> bool:
    return bool(parse_wheel_filename(path.name)[3] & NODE_TAGS)


def wheel_metadata(path: Path):
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(meta).decode())


def wheel_requires(path: Path, extras: frozenset[str] = frozenset()) -> list[Requirement]:
    """The wheel's Requires-Dist that apply on the node when installed with `extras`."""
    out = []
    for line in wheel_metadata(path).get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(
            req.marker.evaluate({**NODE_MARKERS, "extra": e}) for e in ("", *extras)
        ):
            out.append(req)
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------- fetch / build
def pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def cached_wheel(name: str, spec: SpecifierSet) -> Path | None:
    """The newest cached wheel of `name` that satisfies `spec` and installs on the node."""
    hits = []
    for path in CACHE.glob("*.whl"):
        wname, version = wheel_name_version(path)
        if wname == name and spec.contains(version, prereleases=True) and wheel_fits_node(path):
            hits.append((version, path))
    return max(hits)[1] if hits else None


def fetch(name: str, spec: SpecifierSet) -> Path:
    """A wheel of `name` for the node, from the cache or else PyPI. Prefers this venv's version (tested)."""
    have = venv_version(name)
    if have is not None and spec.contains(have, prereleases=True):
        spec = SpecifierSet(f"=={have}")
    hit = cached_wheel(name, spec)
    if hit:
        return hit
    CACHE.mkdir(parents=True, exist_ok=True)
    if name in FROM_SDIST:
        print(f"building {name}{spec} wheel from its sdist (no CUDA ops) ...", flush=True)
        # --no-build-isolation: its setup.py imports torch, and this venv's is the one we have.
        # --no-cache-dir: never reuse a wheel pip built earlier with other settings (e.g. for the CPU venv).
        flags = ["--no-deps", "--no-build-isolation", "--no-cache-dir", "--no-binary", name]
        pip("wheel", *flags, "-w", str(CACHE), f"{name}{spec}", env=FROM_SDIST[name])
    else:
        print(f"downloading {name}{spec}", flush=True)
        flags = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        flags += ["--abi", "cp312", *(a for p in NODE_PLATFORMS for a in ("--platform", p))]
        pip("download", *flags, "-d", str(CACHE), f"{name}{spec}")
    hit = cached_wheel(name, spec)
    if hit is None:
        raise BuildError(f"no wheel of {name}{spec} for CPython 3.12 manylinux x86_64 after pip ran")
    return hit


def build_project(dest: Path) -> Path:
    """The project's wheel, built from a clean copy of its files (setuptools' in-tree build/lib keeps stale
    modules) including new, not yet committed ones."""
    print(f"building {PROJECT} wheel from {ROOT}", flush=True)
    git = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(git, cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for rel in filter(None, listed):
            if (ROOT / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, src / rel)
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), str(src))
    return next(dest.glob(f"{PROJECT}-*.whl"))


def resolve() -> dict[str, Path]:
    """SHIP plus the closure of what those need and the node lacks: name -> cached wheel."""
    chosen: dict[str, Path] = {}
    done = set()  # (name, extras) whose requirements are queued already: dependency cycles exist
    todo = [Requirement(f"{name}=={venv_version(name)}") for name in SHIP]
    while todo:
        req = todo.pop(0)
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if on_node(name) or (name, extras) in done:
            continue
        done.add((name, extras))
        if name not in chosen:
            chosen[name] = fetch(name, req.specifier)
        todo += wheel_requires(chosen[name], extras)
    return chosen  # a version that misses a later requirement is reported by check_closure()


# ------------------------------------------------------------------------------------------------- check
def check_closure(wheels_dir: Path) -> list[str]:
    """Every way the folder fails the node: unmet or mismatched requirements, wheels the node can't install.
    Empty when pip on the node can install SHIP from the folder plus what the node has."""
    problems, wheels = [], {}
    for path in sorted(wheels_dir.glob("*.whl")):
        name, version = wheel_name_version(path)
        if name in wheels:
            problems.append(f"two wheels of {name}: {wheels[name][1].name} and {path.name}")
        wheels[name] = (version, path)
        if not wheel_fits_node(path):
            problems.append(f"{path.name} does not install on CPython 3.12 manylinux x86_64")
        requires_python = wheel_metadata(path).get("Requires-Python")
        if requires_python and not SpecifierSet(requires_python).contains(
            NODE_MARKERS["python_full_version"]
        ):
            problems.append(f"{path.name} requires Python {requires_python}")
    for name in SHIP:
        if canonicalize_name(name) not in wheels:
            problems.append(f"{name} (shipped by run.sh) has no wheel in {wheels_dir}")
    todo = [(name, frozenset()) for name in wheels if name != PROJECT]
    done = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        for req in wheel_requires(wheels[name][1], extras):
            dep = canonicalize_name(req.name)
            need = f"{req} (required by {name})"
            if dep in wheels:
                if not req.specifier.contains(wheels[dep][0], prereleases=True):
                    problems.append(f"unmet requirement {need}: the folder has {dep} {wheels[dep][0]}")
                todo.append((dep, frozenset(req.extras)))
            elif on_node(dep):
                # the node's version is unknown; this venv's copy of the same stack stands in for it
                have = venv_version(dep)
                if have is not None and not req.specifier.contains(have, prereleases=True):
                    problems.append(
                        f"unmet requirement {need}: the node stack (as in .venv) has {dep} {have}"
                    )
            else:
                problems.append(f"unmet requirement {need}: neither in {wheels_dir} nor on the node")
    return problems


# ------------------------------------------------------------------------------------------------ bundle
RUN_SH = """#!/usr/bin/env bash
# Installs this bundle's wheels with no index and runs the GPU check. Run it on the node: bash run.sh [ARGS]
# PYTHON=/path/to/python3.12 picks another interpreter than `python3`.
set -euo pipefail
cd "$(dirname "$0")"
PY="${{PYTHON:-python3}}"
command -v "$PY" >/dev/null || {{ echo "run.sh: $PY not found; set PYTHON=/path/to/python3.12" >&2; exit 2; }}
"$PY" -c 'import sys; sys.exit(sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 12))' || {{
    echo "run.sh: this bundle is for CPython 3.12; $PY is $("$PY" -VV 2>&1 | head -1). Set PYTHON=..." >&2
    exit 2
}}
"$PY" -m pip --version >/dev/null 2>&1 || {{ echo "run.sh: $PY has no pip (ensurepip?)" >&2; exit 2; }}
# deepspeed: compile no op at install or import time, and don't insist on a CUDA toolkit (nvcc) being there
export DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 PIP_DISABLE_PIP_VERSION_CHECK=1
echo ">> installing {project} (no dependencies: what the check needs follows)"
"$PY" -m pip install --no-index --find-links wheels --no-deps wheels/{project}-*.whl
echo ">> installing {ship} (resolved against installed packages and ./wheels)"
"$PY" -m pip install --no-index --find-links wheels {pins}
[ -f gpu_check.py ] || {{ echo "run.sh: gpu_check.py is not in this bundle (rebuild it)" >&2; exit 2; }}
exec "$PY" gpu_check.py "$@"
"""


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(out: Path) -> int:
    start = time.time()
    for name in node_assumption_drift():
        print(f"warning: the node stack here also needs {name}, missing from NODE_PACKAGES", file=sys.stderr)
    wheels_dir = out / "wheels"
    shutil.rmtree(wheels_dir, ignore_errors=True)
    for stale in ("run.sh", "manifest.json", *(Path(f).name for f in EXTRA_FILES)):
        (out / stale).unlink(missing_ok=True)
    wheels_dir.mkdir(parents=True)

    chosen = resolve()
    for path in chosen.values():
        shutil.copy2(path, wheels_dir / path.name)
    build_project(wheels_dir)
    for rel in EXTRA_FILES:
        if (ROOT / rel).is_file():
            shutil.copy2(ROOT / rel, out / Path(rel).name)
        else:
            print(f"warning: {rel} does not exist yet; the bundle has no copy of it", file=sys.stderr)
    pins = " ".join(f"{n}=={wheel_name_version(chosen[canonicalize_name(n)])[1]}" for n in SHIP)
    run_sh = out / "run.sh"
    run_sh.write_text(RUN_SH.format(project=PROJECT, ship=" ".join(SHIP), pins=pins))
    run_sh.chmod(0o755)

    problems = check_closure(wheels_dir)
    wheels = sorted(wheels_dir.glob("*.whl"))
    manifest = {
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "node": {
            "python": "3.12",
            "platforms": NODE_PLATFORMS,
            "assumed_installed": sorted(NODE_PACKAGES),
            "assumed_installed_pattern": NODE_CUDA_LIBS.pattern,
        },
        "installs": {"no_deps": PROJECT, "resolved": pins.split()},
        "wheels": [{"file": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)} for p in wheels],
        "wheels_bytes": sum(p.stat().st_size for p in wheels),
        "bundle_bytes_without_manifest": folder_bytes(out),
        "limit_bytes": LIMIT_BYTES,
        "closure_problems": problems,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    total = folder_bytes(out)
    for p in wheels:
        print(f"  {p.stat().st_size / 2**20:7.2f} MiB  {p.name}")
    print(
        f"bundle {out}: {len(wheels)} wheels, {total / 2**20:.2f} MiB of {LIMIT_BYTES / 2**20:.0f} MiB "
        f"({total} bytes), built in {time.time() - start:.1f} s"
    )
    for problem in problems:
        print(f"closure: {problem}", file=sys.stderr)
    if total > LIMIT_BYTES:
        limit = f"{LIMIT_BYTES / 2**20:g} MiB"
        print(
            f"error: the bundle is {total / 2**20:.2f} MiB ({total} bytes), over the {limit} limit",
            file=sys.stderr,
        )
        return 1
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"bundle folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--check", action="store_true", help="only check the closure of OUT/wheels")
    args = parser.parse_args(argv)
    if args.check:
        problems = check_closure(args.out / "wheels")
        for problem in problems:
            print(f"closure: {problem}", file=sys.stderr)
        print("closure: FAILED" if problems else f"closure: OK ({args.out / 'wheels'})")
        return 1 if problems else 0
    try:
        return build(args.out.resolve())
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
