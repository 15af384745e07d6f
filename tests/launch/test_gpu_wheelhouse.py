"""The offline wheelhouse behind `make gpu-check` (infra/gpu-check/build_wheelhouse.py).

The first run downloads ~55 MiB from PyPI into .cache/gpu-check/ and builds deepspeed's wheel (~30 s);
later runs build from that cache offline in seconds. The install test runs the bundle's own run.sh on a real
CPython 3.12 where one exists, against stand-ins for the node's packages.
"""

import glob
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parents[2]
BUILDER = REPO / "infra" / "gpu-check" / "build_wheelhouse.py"

pytestmark = pytest.mark.slow


def load_builder():
    spec = importlib.util.spec_from_file_location("build_wheelhouse", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wh = load_builder()


def builder(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BUILDER), *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-check")
    proc = builder("--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MiB" in proc.stdout  # the final size line
    return out


def wheels(bundle: Path) -> list[Path]:
    return sorted((bundle / "wheels").glob("*.whl"))


def test_bundle_fits_is_closed_and_described(bundle):
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert total <= 64 * 2**20, f"bundle is {total / 2**20:.2f} MiB"
    assert wh.check_closure(bundle / "wheels") == []
    proc = builder("--check", "--out", str(bundle))
    assert proc.returncode == 0 and "closure: OK" in proc.stdout, proc.stdout + proc.stderr

    names = {parse_wheel_filename(p.name)[0] for p in wheels(bundle)}
    assert {
        "motus",
        "diffusers",
        "deepspeed",
        "pydantic",
        "pydantic-core",
        "pydantic-settings",
    } <= names
    assert "av" not in names  # 34 MiB; the check's npz tiers never import PyAV

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {w["file"] for w in manifest["wheels"]} == {p.name for p in wheels(bundle)}
    listed = {w["file"]: w for w in manifest["wheels"]}
    pydantic_core = next(p for p in wheels(bundle) if p.name.startswith("pydantic_core-"))
    assert listed[pydantic_core.name]["sha256"] == wh.sha256(pydantic_core)
    assert manifest["closure_problems"] == [] and "transformers" in manifest["node"]["assumed_installed"]

    run_sh = (bundle / "run.sh").read_text()
    assert os.access(bundle / "run.sh", os.X_OK)
    assert "--no-index --find-links wheels --no-deps wheels/motus-" in run_sh
    assert re.search(r"--no-index --find-links wheels diffusers==\S+ deepspeed==\S+ pydantic==", run_sh)


def test_wheels_are_for_the_node_and_only_what_it_lacks(bundle):
    for path in wheels(bundle):
        name, _, _, tags = parse_wheel_filename(path.name)
        if name == "deepspeed":  # built from the sdist with no CUDA op compiled: must stay pure Python
            assert {str(t) for t in tags} == {"py3-none-any"}, path.name
        # the CUDA stack and everything else the node has stays out (nvidia-ml-py is deepspeed's small pure
        # NVML binding, which CUDA torch does not bring)
        assert not wh.on_node(name) and name not in {"mlflow", "dvc", "prefect"}, path.name
        assert not (name.startswith("nvidia-") and name != "nvidia-ml-py"), path.name
        for tag in tags:
            if tag.platform == "any":
                continue
            assert re.fullmatch(r"manylinux\w*_x86_64", tag.platform), path.name
            assert (tag.interpreter, tag.abi) == ("cp312", "cp312") or tag.abi in {"abi3", "none"}, path.name
        assert wh.wheel_fits_node(path), path.name


# Installed in the node-like interpreter: finds the allowed packages (modules and metadata) in this venv's
# site-packages, which is not on its sys.path, so nothing else there exists for it.
_NODE_ONLY = """import importlib.abc, importlib.machinery, importlib.metadata as md, re, sys

SITE = {site!r}
TOPS = frozenset({tops!r})
DISTS = frozenset({dists!r})


class NodeOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if path is None and name in TOPS:
            return importlib.machinery.PathFinder.find_spec(name, [SITE], target)
        return None

    def find_distributions(self, context=md.DistributionFinder.Context()):
        here = md.DistributionFinder.Context(name=context.name, path=[SITE])
        for dist in importlib.machinery.PathFinder.find_distributions(here):
            if re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower() in DISTS:
                yield dist


sys.meta_path.append(NodeOnly())
"""


def node_like_python(bundle: Path, dest: Path) -> Path:
    """A virtualenv that sees only the node's packages and the bundle's (this venv's copies) plus this checkout:
    a stand-in for the bare GPU node, on this machine's Python. The packages keep their real paths, so a C++
    extension JIT-built here (DeepSpeed's CPU comm op) has the suite's build command and is reused; a copy at
    other paths would be rebuilt into the shared extension folder, and every later job would rebuild it back."""
    allowed = wh.NODE_PACKAGES | {parse_wheel_filename(p.name)[0] for p in wheels(bundle)} - {"motus"}
    tops: set[str] = set()
    for dist in importlib.metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) in allowed:
            tops |= {f.parts[0].removesuffix(".py") for f in dist.files or []
                     if (len(f.parts) > 1 and not f.parts[0].endswith((".dist-info", ".data")))
                     or f.parts[0].endswith(".py")} - {"..", "__pycache__"}
    base = Path(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(dest / "node")], check=True, timeout=120)
    node_site = next((dest / "node" / "lib").glob("python3.*/site-packages"))
    site = str(Path(importlib.util.find_spec("torch").origin).parents[1])
    (node_site / "_motus_node_only.py").write_text(_NODE_ONLY.format(site=site, tops=sorted(tops),
                                                                     dists=sorted(allowed)))
    (node_site / "node.pth").write_text(f"{REPO}\nimport _motus_node_only\n")
    return dest / "node" / "bin" / "python"


def test_make_gpu_check_dry_mode_runs_on_the_node_and_the_bundle_alone(bundle, tmp_path):
    """`make gpu-check` without CUDA: the bundle, then the check's dry mode (small preset, bf16 autocast on the
    CPU, 3 steps), run by an interpreter that sees nothing but the node's packages and the bundle's, so a module
    the bundle forgot fails here. Its JSON is what a GPU run prints, with the CPU's numbers."""
    python = node_like_python(bundle, tmp_path)
    probe = subprocess.run([str(python), "-c", "import mlflow"], capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "mlflow" in probe.stderr  # the stand-in really is bare
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MAKEFLAGS", "MFLAGS")}
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", f"GPU_CHECK={bundle}",
                           f"CHECK_PYTHON={python}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "dry mode" in proc.stdout
    result = json.loads((bundle / "result.json").read_text())
    assert result["ok"] is True and result["mode"] == "dry" and result["device"] == "cpu"
    for stage in ("stage1", "stage3"):
        run = result["stages"][stage]
        assert run["exit"] == 0 and run["steps"] == 3 and run["precision"] == "bf16" and run["finite"], run
    timing = result["full_stage3"]
    assert timing["preset"] == "small" and timing["parameters"]["action"] > 0
    rows = [b for b in timing["batches"] if "step_s" in b]
    assert [b["batch"] for b in rows] == [1, 2]
    for b in rows:
        assert b["finite"] and b["step_s"] > 0 and b["tflops"] > 0 and b["estimated_peak_gib"] > 0, b
    # FLOPs per step grow with the batch (the analytic count, not a constant)
    assert rows[1]["tflop_per_step"] > 1.9 * rows[0]["tflop_per_step"]


def test_check_names_the_missing_requirement(bundle, tmp_path):
    shutil.copytree(bundle / "wheels", tmp_path / "wheels")
    for path in (tmp_path / "wheels").glob("pydantic_core-*.whl"):
        path.unlink()
    problems = wh.check_closure(tmp_path / "wheels")
    assert any("pydantic-core" in p and "required by pydantic" in p for p in problems), problems
    proc = builder("--check", "--out", str(tmp_path))
    assert proc.returncode == 1 and "pydantic-core" in proc.stderr, proc.stdout + proc.stderr


def test_build_fails_naming_the_size_over_the_limit(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(wh, "LIMIT_BYTES", 2**20)  # the cache is warm (bundle): this build is offline
    assert wh.main(["--out", str(tmp_path)]) == 1
    assert re.search(r"the bundle is [\d.]+ MiB \(\d+ bytes\), over the 1 MiB limit", capsys.readouterr().err)


@pytest.mark.skipif(sys.version_info[:2] == (3, 12), reason="needs a Python other than 3.12 to refuse")
def test_run_sh_refuses_another_python(bundle):
    proc = subprocess.run(
        ["bash", str(bundle / "run.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "CPython 3.12" in proc.stderr, proc.stdout + proc.stderr


def python312() -> str | None:
    found = [os.environ.get("MOTUS_PYTHON312"), shutil.which("python3.12")]
    found += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    for exe in filter(None, found):
        probe = subprocess.run(
            [exe, "-c", "import sys, venv; assert sys.version_info[:2] == (3, 12)"], capture_output=True
        )
        if probe.returncode == 0:
            return exe
    return None


def test_run_sh_installs_offline_on_cpython_312(bundle, tmp_path):
    """run.sh on a CPython 3.12 venv whose 'node' packages are metadata stand-ins (no torch here): pip must
    resolve the shipped list from ./wheels plus what is installed, with no index, and the binary wheels
    (pydantic-core, Pillow) must import on 3.12."""
    exe = python312()
    if exe is None:
        pytest.skip("no CPython 3.12 on this machine (set MOTUS_PYTHON312)")
    subprocess.run([exe, "-m", "venv", str(tmp_path / "node")], check=True, timeout=300)
    site = next((tmp_path / "node" / "lib").glob("python3.12/site-packages"))
    for name in wh.NODE_PACKAGES:
        version = wh.venv_version(name)
        if version is not None:  # installed metadata only: enough for pip's resolver
            info = site / f"{name.replace('-', '_')}-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            (info / "RECORD").write_text("")
    # pydantic-core imports typing_extensions, a node package: the real (pure-Python) module stands in
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy2(importlib.util.find_spec("typing_extensions").origin, real)

    node_bundle = tmp_path / "bundle"
    shutil.copytree(bundle, node_bundle)
    (node_bundle / "gpu_check.py").write_text(
        "import importlib.metadata as md, sys\n"
        "import msgpack, PIL.Image, psutil, pydantic, pydantic_settings\n"
        "print('node-ok', sys.version_info[:2], pydantic.VERSION, sys.argv[1:],"
        " [md.version(n) for n in ('motus', 'diffusers', 'deepspeed')])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(
        PYTHON=str(tmp_path / "node" / "bin" / "python"), PIP_CONFIG_FILE=os.devnull, PYTHONPATH=str(real)
    )
    proc = subprocess.run(
        ["bash", str(node_bundle / "run.sh"), "--flag"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "node-ok (3, 12)" in proc.stdout and "['--flag']" in proc.stdout, proc.stdout[-2000:]
