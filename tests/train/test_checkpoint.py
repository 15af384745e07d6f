"""Atomic, resumable checkpoints (motus.train.checkpoint) around a real DeepSpeed engine on CPU.

DeepSpeed / torch.distributed state must not live in the pytest process, so every engine runs in a
subprocess (the worker script below, written to tmp): one that trains uninterrupted and saves on the way,
one that resumes from the saved checkpoint, and the same pair under torchrun with 2 ranks (slow).
The pytest process only reads, copies and damages what they wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from motus.launch.local import free_port as _free_port
from motus.train.checkpoint import (
    CheckpointError,
    CheckpointManifest,
    content_hash,
    find_latest_complete,
    load_checkpoint,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
EXT_CACHE = REPO / ".cache" / "torch_extensions"  # DeepSpeed's compiled shm op, reused across runs

WORKER = textwrap.dedent('''
    import faulthandler, json, os, random, shutil, signal, sys
    from pathlib import Path

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test's hang guard asks where we are

    import deepspeed
    import numpy as np
    import torch
    from torch import nn

    from motus.model import MotusModel, build_config
    from motus.train.checkpoint import CheckpointError, find_latest_complete, load_checkpoint, save_checkpoint

    args = json.loads(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    root = Path(args["root"])
    MICRO = 2

    # a resumed job starts from different weights and RNG: everything must come from the checkpoint
    seed = args["seed"] + rank  # each rank its own RNG stream
    torch.manual_seed(seed); np.random.seed(seed); random.seed(seed)
    cfg = build_config("tiny")

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = MotusModel(cfg, with_vlm=False, with_vae=False)

        def forward(self, **batch):
            return self.m.training_loss(**batch)["loss"]  # draws timesteps and noise from the global RNG

    model = Loss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    # warm-up then decay: a different LR at every step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 3 if s < 2 else 0.7 ** (s - 1))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config={
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args["zero_stage"]}, "steps_per_print": 10**9})

    def batch(position):  # the data stream: its position (samples consumed, all ranks) picks the batch
        g = torch.Generator().manual_seed(1000 + position + rank * MICRO)
        return dict(video_latents=torch.randn(MICRO, *cfg.latent_shape, generator=g),
                    text_embeds=torch.randn(MICRO, 5, cfg.video["text_dim"], generator=g),
                    actions=torch.randn(MICRO, cfg.action.chunk, cfg.action.action_dim, generator=g),
                    state=torch.randn(MICRO, cfg.action.state_dim, generator=g))

    def probe():  # one draw from each RNG the checkpoint restores
        return [random.random(), float(np.random.rand()), float(torch.rand(1))]

    def save(dir, step, **kw):
        return str(save_checkpoint(engine, root / dir, step, stage="stage1", data_position=position,
                                   config_hash="cfg123", parent="models:/motus-vgm/3",
                                   wall_seconds=10.0 * step, extra={"note": "test"}, **kw))

    out = {"losses": {}, "lrs": {}}
    position, step = 0, 0
    if args["mode"] == "full":  # the run folder on a disk too small for one checkpoint
        loss = engine(**batch(position)); engine.backward(loss); engine.step()
        try:
            save("run", 1)
        except CheckpointError as e:
            out["error"] = str(e)
        out["left"] = sorted(p.name for p in (root / "run").iterdir()) if (root / "run").exists() else []
    elif args["mode"] == "train":
        for step in range(1, args["steps"] + 1):
            loss = engine(**batch(position)); engine.backward(loss); engine.step()
            position += MICRO * world
            out["losses"][step] = loss.item(); out["lrs"][step] = engine.get_lr()[0]
            if args.get("prune"):
                out.setdefault("pruned_saves", []).append(save("prune", step, keep_last=2, hash_files=False))
            if step == args["save_at"]:
                out["saved"] = save("run", step)
                out["probe"] = probe()
    else:
        if args.get("errors"):
            for name in ("missing", "ws/step-000002"):
                try:
                    load_checkpoint(engine, root / name)
                except CheckpointError as e:
                    out.setdefault("errors", []).append(str(e))
        ckpt = find_latest_complete(root / "run")
        m = load_checkpoint(engine, ckpt)
        out["loaded"] = str(ckpt)
        out["manifest"] = {"step": m.step, "data_position": m.data_position, "wall_seconds": m.wall_seconds}
        out["lr_after_load"] = engine.get_lr()[0]
        out["probe"] = probe()
        step, position = m.step, m.data_position
        while step < args["steps"]:
            step += 1
            loss = engine(**batch(position)); engine.backward(loss); engine.step()
            position += MICRO * world
            out["losses"][step] = loss.item(); out["lrs"][step] = engine.get_lr()[0]
        if args.get("branch"):  # history re-written from step 3: step-000004 moves aside, step-000003 replaced
            out["branch_saved"] = save("branch", 3, keep_last=None)
    Path(args["out"]).mkdir(parents=True, exist_ok=True)
    (Path(args["out"]) / f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.destroy_process_group()
''')


def _run_worker(tmp: Path, args: dict, nproc: int = 1, timeout: int = 600) -> list[dict]:
    EXT_CACHE.mkdir(parents=True, exist_ok=True)
    script = tmp / "ckpt_worker.py"
    script.write_text(WORKER)
    out = tmp / f"out-{args['mode']}"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(EXT_CACHE), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    port = _free_port()
    payload = json.dumps({"root": str(tmp / "ckpts"), **args, "out": str(out)})
    if nproc == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, str(script), payload]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), payload]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # a hang guard, sized for a loaded 2-core machine running the whole suite: before killing, ask every
        # process of the worker for its Python stacks, so a real hang says where it hung
        os.killpg(proc.pid, signal.SIGUSR1)
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"worker still running after {timeout} s; its stacks:\n{stdout[-4000:]}\n{stderr[-12000:]}")
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{stdout[-4000:]}\n{stderr[-8000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


# --- one uninterrupted run and one resumed run (single process), shared by the tests below ---------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    stale = tmp / "ckpts" / "prune" / ".tmp-step-000001-dead"  # a crashed save: removed by the next save
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    train = _run_worker(tmp, dict(mode="train", seed=0, zero_stage=2, steps=4, save_at=2, prune=True))[0]

    # material for the resumed run: a copy whose manifest claims 2 ranks, and a history to branch off
    ws = tmp / "ckpts" / "ws" / "step-000002"
    shutil.copytree(Path(train["saved"]), ws)
    data = json.loads((ws / "manifest.json").read_text())
    (ws / "manifest.json").write_text(json.dumps({**data, "world_size": 2}))
    shutil.copytree(tmp / "ckpts" / "prune", tmp / "ckpts" / "branch")

    resume = _run_worker(tmp, dict(mode="resume", seed=123, zero_stage=2, steps=4, errors=True, branch=True))[0]
    return dict(tmp=tmp, root=tmp / "ckpts", train=train, resume=resume)


def test_save_writes_files_manifest_and_latest(runs):
    run = runs["root"] / "run"
    ckpt = Path(runs["train"]["saved"])
    assert ckpt == run / "step-000002"
    assert (run / "latest").read_text().strip() == "step-000002"
    assert not list(run.glob(".tmp-*")) and not (run / "latest.tmp").exists()
    m = CheckpointManifest.read(ckpt)
    assert (m.stage, m.step, m.data_position, m.world_size, m.zero_stage) == ("stage1", 2, 4, 1, 2)
    assert (m.config_hash, m.parent, m.wall_seconds, m.extra) == ("cfg123", "models:/motus-vgm/3", 20.0, {"note": "test"})
    assert m.rng_files == ["rng-rank0.pt"] and (ckpt / "rng-rank0.pt").is_file()
    assert m.created_at.endswith("+00:00") and m.motus_version
    # the LR schedule as of step 2: scheduler stepped twice, lr = 1e-2 * lambda(2)
    assert m.lr_schedule["step"] == 2 and m.lr_schedule["last_lr"] == [pytest.approx(1e-2 * 0.7)]
    assert m.lr_schedule["state_dict"]["last_epoch"] == 2
    # DeepSpeed's files live under ds/; every file is listed with its size and sha256
    assert any(f.startswith("ds/") and "optim_states" in f for f in m.files)
    assert set(m.files) == {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    for rel, entry in m.files.items():
        assert entry["bytes"] == (ckpt / rel).stat().st_size and len(entry["sha256"]) == 64
    assert m.content_hash == content_hash(m.files) and len(m.content_hash) == 64
    assert verify_checkpoint(ckpt) == []


def test_resume_continues_exactly_like_the_uninterrupted_run(runs):
    train, resume = runs["train"], runs["resume"]
    assert resume["loaded"] == train["saved"]
    assert resume["manifest"] == {"step": 2, "data_position": 4, "wall_seconds": 20.0}
    assert resume["lr_after_load"] == train["lrs"]["2"]
    assert resume["probe"] == train["probe"]  # python, numpy and torch RNG restored
    # module + optimizer + LR schedule restored: the next losses and LRs are bit-identical (CPU, fp32)
    for step in ("3", "4"):
        assert resume["losses"][step] == train["losses"][step], step
        assert resume["lrs"][step] == train["lrs"][step], step
    assert train["lrs"]["3"] != train["lrs"]["2"] != train["lrs"]["4"]  # the schedule really moves


def test_load_errors_name_the_path(runs):
    missing, ws = runs["resume"]["errors"]
    assert str(runs["root"] / "missing") in missing and "does not exist" in missing
    assert str(runs["root"] / "ws" / "step-000002") in ws and "2 ranks" in ws and "allow_world_size_change" in ws


def test_load_missing_dir_raises_before_touching_the_engine(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope")):
        load_checkpoint(object(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no manifest at .*empty"):
        load_checkpoint(object(), tmp_path / "empty")


def test_keep_last_prunes_old_and_leftover_tmp(runs):
    prune = runs["root"] / "prune"
    assert sorted(p.name for p in prune.iterdir()) == ["latest", "step-000003", "step-000004"]
    assert (prune / "latest").read_text().strip() == "step-000004"
    m = CheckpointManifest.read(prune / "step-000004")  # hash_files=False: sizes only
    assert m.content_hash is None and all(e["sha256"] is None and e["bytes"] > 0 for e in m.files.values())
    assert verify_checkpoint(prune / "step-000004") == []
    assert find_latest_complete(prune) == prune / "step-000004"


def test_saving_an_older_step_moves_newer_history_aside(runs):
    branch = runs["root"] / "branch"
    assert runs["resume"]["branch_saved"] == str(branch / "step-000003")
    names = sorted(p.name for p in branch.iterdir())
    assert names[:2] == ["latest", "step-000003"] and names[2].startswith("superseded-step-000004-")
    assert CheckpointManifest.read(branch / "step-000003").content_hash is not None  # the new attempt
    assert find_latest_complete(branch) == branch / "step-000003"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tmp_and_broken_checkpoints_are_never_picked(runs, tmp_path, caplog):
    good = Path(runs["train"]["saved"])
    root = tmp_path / "ckpts"
    _copy(good, root / "step-000002")
    _copy(good, root / ".tmp-step-000009-abcd1234")  # complete-looking, but never committed
    trunc = _copy(good, root / "step-000008")  # a truncated DeepSpeed file
    big = max((p for p in (trunc / "ds").iterdir()), key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[:100])
    (_copy(good, root / "step-000007") / "rng-rank0.pt").unlink()  # a missing file
    (_copy(good, root / "step-000006") / "manifest.json").write_text("{not json")
    (_copy(good, root / "step-000005") / "manifest.json").unlink()
    _copy(good, root / "step-000004")  # manifest says step 2
    (root / "latest").write_text("step-000002")
    with caplog.at_level(logging.WARNING, logger="motus.train.checkpoint"):
        assert find_latest_complete(root) == root / "step-000002"
    text = caplog.text
    for name, why in [("step-000008", "bytes"), ("step-000007", "missing file rng-rank0.pt"),
                      ("step-000006", "unreadable manifest"), ("step-000005", "no manifest"),
                      ("step-000004", "manifest says step 2")]:
        assert f"skipping checkpoint {root / name}" in text and why in text, name
    assert "step-000009" not in text
    assert verify_checkpoint(root / "step-000008") and verify_checkpoint(root / "step-000007")


def test_verify_recomputes_hashes(runs, tmp_path):
    ckpt = _copy(Path(runs["train"]["saved"]), tmp_path / "step-000002")
    assert verify_checkpoint(ckpt) == []
    f = ckpt / "rng-rank0.pt"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 can tell
    f.write_bytes(bytes(data))
    assert verify_checkpoint(ckpt) == ["rng-rank0.pt sha256 differs from the manifest"]
    assert verify_checkpoint(ckpt, check_hashes=False) == []
    assert find_latest_complete(tmp_path) == ckpt  # the scan checks sizes only (cheap)
    (ckpt / "stray.bin").write_bytes(b"x")
    assert any("stray.bin" in p for p in verify_checkpoint(ckpt, check_hashes=False))


def test_latest_pointing_at_a_deleted_dir_falls_back_to_the_scan(runs, tmp_path, caplog):
    root = _copy(runs["root"] / "prune", tmp_path / "ckpts")
    shutil.rmtree(root / "step-000004")
    with caplog.at_level(logging.WARNING, logger="motus.train.checkpoint"):
        assert find_latest_complete(root) == root / "step-000003"
    assert "points to step-000004 (missing)" in caplog.text
    assert find_latest_complete(tmp_path / "nothing-here") is None


@pytest.mark.slow
def test_two_process_save_and_resume(tmp_path):
    train = _run_worker(tmp_path, dict(mode="train", seed=0, zero_stage=2, steps=4, save_at=2), nproc=2)
    ckpt = Path(train[0]["saved"])
    assert [t["saved"] for t in train] == [str(ckpt)] * 2  # the same final path on every rank
    m = CheckpointManifest.read(ckpt)
    assert (m.world_size, m.data_position, m.rng_files) == (2, 8, ["rng-rank0.pt", "rng-rank1.pt"])
    assert {"ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(m.files)
    assert verify_checkpoint(ckpt) == []

    resume = _run_worker(tmp_path, dict(mode="resume", seed=123, zero_stage=2, steps=4), nproc=2)
    for r in range(2):
        assert resume[r]["loaded"] == str(ckpt)
        assert resume[r]["probe"] == train[r]["probe"], r  # each rank its own RNG stream
        assert resume[r]["losses"] == {k: v for k, v in train[r]["losses"].items() if int(k) > 2}, r
        assert resume[r]["lrs"]["4"] == train[r]["lrs"]["4"]
    assert train[0]["losses"]["3"] != train[1]["losses"]["3"]  # the ranks really saw different data


@pytest.mark.slow
def test_zero3_save_and_resume(tmp_path):
    """Nothing assumes ZeRO-2's layout: a ZeRO-3 engine (partitioned parameters) round-trips too."""
    train = _run_worker(tmp_path, dict(mode="train", seed=0, zero_stage=3, steps=4, save_at=2))[0]
    m = CheckpointManifest.read(Path(train["saved"]))
    assert m.zero_stage == 3 and any("model_states" in f for f in m.files)
    resume = _run_worker(tmp_path, dict(mode="resume", seed=123, zero_stage=3, steps=4))[0]
    assert resume["probe"] == train["probe"]
    assert resume["losses"] == {k: v for k, v in train["losses"].items() if int(k) > 2}
    assert resume["lrs"] == {k: v for k, v in train["lrs"].items() if int(k) > 2}


def test_a_full_disk_says_no_space_and_leaves_no_partial_save(tmp_path):
    """A real full disk (a 512 KB tmpfs; a checkpoint of the tiny model takes ~1 MB): "no space left on <path>" with
    what a checkpoint needs, not a raw `iostream error`, and no `.tmp-*` folder that would block every rerun."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the full-disk case needs one")
    try:
        out = _run_worker(tmp_path, dict(mode="full", seed=0, zero_stage=2, root=str(disk)))[0]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert out["error"].startswith(f"no space left on {disk}/run (a checkpoint needs ~"), out
    assert "free): the partial save .tmp-step-000001-" in out["error"] and out["left"] == []


# --- asynchronous saves (in the pytest process: a stand-in engine, no process group) -----------------------
class _Writer:
    """DeepSpeed's default checkpoint engine, reduced to what a save calls."""

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path):
        torch.save(state_dict, path)


class _Engine:
    """Saves like DeepSpeed: the state dicts go through `checkpoint_engine.save`, views of one storage included."""

    def __init__(self):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(64, 64)
        self.checkpoint_engine = _Writer()

    def save_checkpoint(self, save_dir, tag, client_state):
        d = Path(save_dir) / tag
        self.checkpoint_engine.makedirs(d, exist_ok=True)
        state = {"module": self.module.state_dict(), "row0": self.module.weight[0], **client_state}
        self.checkpoint_engine.save(state, str(d / "mp_rank_00_model_states.pt"))


def test_async_save_snapshots_at_the_step_and_commits_only_when_written(tmp_path, monkeypatch):
    """The loop changes the weights while the save is still writing (held on an event): the files hold the weights
    of the save's step; `latest` and the scan show the previous checkpoint until the write is complete; a failed
    background write is raised at the next step boundary, naming the checkpoint."""
    import threading

    from motus.train import checkpoint as ck

    gate, writing = threading.Event(), threading.Event()
    real_write = ck._write_captured

    def held_write(*a, **kw):
        writing.set()
        assert gate.wait(20), "the test never released the writer"
        return real_write(*a, **kw)

    engine, root = _Engine(), tmp_path / "ckpts"
    saver = ck.CheckpointSaver(background=True)
    meta = dict(stage="toy", config_hash="cfg", parent=None, wall_seconds=1.0)
    first = saver.save(engine, root, 1, data_position=4, **meta)
    assert saver.wait() == first and find_latest_complete(root) == first

    monkeypatch.setattr(ck, "_write_captured", held_write)
    at_step_2 = engine.module.state_dict()
    at_step_2 = {k: v.clone() for k, v in at_step_2.items()}
    second = saver.save(engine, root, 2, data_position=8, **meta)
    assert writing.wait(20)
    with torch.no_grad():  # the next optimizer steps, while the save is in flight
        for p in engine.module.parameters():
            p.mul_(-3.0).add_(1.0)
    assert saver.in_flight() == second and not second.exists()
    assert find_latest_complete(root) == first and (root / "latest").read_text().strip() == "step-000001"
    assert [p.name.startswith(".tmp-step-000002-") for p in root.iterdir() if p.name.startswith(".tmp")] == [True]
    gate.set()
    assert saver.wait() == second
    assert find_latest_complete(root) == second and (root / "latest").read_text().strip() == "step-000002"
    assert verify_checkpoint(second) == []
    saved = torch.load(second / "ds" / "mp_rank_00_model_states.pt", weights_only=True)
    for k, v in at_step_2.items():
        assert torch.equal(saved["module"][k], v), k
    assert torch.equal(saved["row0"], at_step_2["weight"][0])
    assert saved["motus"]["step"] == 2 and not torch.equal(engine.module.weight, at_step_2["weight"])
    assert [t.step for t in saver.timings] == [1, 2] and all(t.write_s is not None for t in saver.timings)

    def broken_write(*a, **kw):
        raise OSError("the disk went away")

    monkeypatch.setattr(ck, "_write_captured", broken_write)
    third = saver.save(engine, root, 3, data_position=12, **meta)
    while saver.in_flight():
        time.sleep(0.01)
    with pytest.raises(CheckpointError, match=r"background save of checkpoint .*step-000003 failed.*disk went away"):
        saver.check()
    saver.check()  # raised once, then cleared
    assert not third.exists() and find_latest_complete(root) == second
