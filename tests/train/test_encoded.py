"""The encoder cache: windows read from it give the live encoders' numbers, a job trains identically from it, a
cache of other weights, geometry or dtypes is a logged miss, and a corrupted one is rebuilt."""

import json
import subprocess

import pytest
import torch
import yaml

from motus.config import load_params
from motus.data.encoded import EncodedWindows, key_difference, miss_reason
from motus.data.loader import TierWindows, collate_windows
from motus.train.encode import encode_plan, encode_tier
from motus.train.inputs import window_inputs

from ..support.project import MOTUS, project_env, shipped_params, short_stages, write_project

TIER = "target-aloha-transfer"  # read by Stage 3: the cache carries the VLM's features too
OTHER = "target-aloha-insertion"  # Stage 3's other tier


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Stage 3 alone on its two tiers, two 60-step episodes each: ~70 windows a tier to encode."""
    raw = short_stages(shipped_params(), 8, batch_size=4, validate_every=4)
    # validation (at step 0 and at the end) samples every mode: two windows, one draw keep a job to seconds
    raw["stages"] = {"stage3": dict(raw["stages"]["stage3"], parent=None, validation={"windows": 2, "draws": 1})}
    raw["gates"] = {k: v for k, v in raw["gates"].items() if k == raw["stages"]["stage3"]["registered_model"]}
    raw["tiers"] = {k: v for k, v in raw["tiers"].items() if k in (TIER, OTHER)}
    for t in raw["tiers"].values():
        t["source"]["options"].update(n=2, max_steps=60)
    return write_project(tmp_path_factory.mktemp("encoded"), raw)


@pytest.fixture(scope="module")
def encoded(project):
    params = load_params(project / "params.yaml")
    manifest, what = encode_tier(params, TIER, root=project)
    assert what.startswith("built (no encoder cache at"), what
    r = subprocess.run([str(MOTUS), "data", "encode", OTHER], cwd=project, env=project_env(project),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and f"encoded/{OTHER}: built (no encoder cache at" in r.stdout, r.stdout + r.stderr
    return project, params, manifest


def test_cached_windows_give_the_live_encoders_numbers(encoded, monkeypatch):
    project, params, manifest = encoded
    monkeypatch.chdir(project)
    plan = encode_plan(params, TIER, project)
    assert plan.stages == ["stage3"] and "vlm" in plan.key["encoders"]
    assert miss_reason(plan.path, plan.key, verify=True) is None
    live = TierWindows(plan.tier, plan.spec, split="all")
    cached = TierWindows(plan.tier, plan.spec, split="all", encoded=EncodedWindows(plan.path, plan.cfg.text_len))
    assert len(live) == len(cached) > 8
    picks = [0, 3, len(live) // 2, len(live) - 1]  # windows of several episodes, a batch as the stage forms one
    items = [cached[i] for i in picks]
    assert all("video" not in it for it in items) and cached.decodes == len({it["episode_id"] for it in items})
    kw = dict(cfg=plan.cfg, vae=plan.encoders.vae, text=plan.encoders.text, vlm=plan.encoders.vlm,
              with_actions=True, device=torch.device("cpu"))
    a = window_inputs(collate_windows([live[i] for i in picks]), **kw)
    b = window_inputs(collate_windows(items), **kw)
    torch.testing.assert_close(b["video_latents"], a["video_latents"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["text_embeds"], a["text_embeds"], rtol=0, atol=0)
    assert torch.equal(b["understanding"].mask, a["understanding"].mask)
    real = a["understanding"].mask
    torch.testing.assert_close(b["understanding"].features[real], a["understanding"].features[real].float(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["actions"], a["actions"], rtol=0, atol=0)
    torch.testing.assert_close(b["state"], a["state"], rtol=0, atol=0)


def _key_with(key: dict, path: tuple[str, ...], value) -> dict:
    out = json.loads(json.dumps(key))
    d = out
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return out


def test_a_cache_from_other_weights_geometry_or_dtype_is_a_miss_with_its_reason(encoded, tmp_path):
    project, params, _ = encoded
    plan = encode_plan(params, TIER, project)
    key = plan.key
    assert key_difference(key, key) is None
    assert "the tier is now" in key_difference(_key_with(key, ("tier_hash",), "0" * 64), key)
    assert "other vae weights" in key_difference(_key_with(key, ("encoders", "vae"), "f" * 64), key)
    assert "vlm computed in bfloat16" in key_difference(_key_with(key, ("dtypes", "vlm"), "bfloat16"), key)
    without_vlm = _key_with(key, ("encoders",), {k: v for k, v in key["encoders"].items() if k != "vlm"})
    assert "no vlm features" in key_difference(without_vlm, key)
    # a cache with more than a job reads (the VLM's features, for a Stage 1 job) stands for it
    assert key_difference(key, without_vlm) is None
    # another window geometry in params.yaml: the same cache is now a miss naming the key, not an error
    raw = yaml.safe_load((project / "params.yaml").read_text())
    assert plan.spec.downsample != 1
    raw["data"]["window"]["downsample"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    other = encode_plan(load_params(tmp_path / "params.yaml"), TIER, project)
    assert f"geometry downsample {plan.spec.downsample}, this job's is 1" in miss_reason(plan.path, other.key)


def test_a_job_trains_identically_from_the_cache_and_says_which_it_read(encoded):
    project, _, manifest = encoded
    env = project_env(project)

    def stage3(run: str) -> tuple[dict[int, float], str]:
        r = subprocess.run([str(MOTUS), "train", "--stage", "3", "--nproc", "1", "--max-steps", "3", "--run-dir",
                            f"runs/{run}", "--no-track"], cwd=project, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        rows = [json.loads(x) for x in (project / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        return {m["step"]: m["train/loss"] for m in rows if "train/loss" in m}, r.stdout + r.stderr

    cached_losses, cached_log = stage3("from-cache")
    assert "is encoded live" not in cached_log
    caches = [project / "data" / "features" / "encoded" / t for t in (TIER, OTHER)]
    caches[1].rename(caches[1].with_name("aside"))  # one tier without a cache: the job reads none
    try:
        live_losses, live_log = stage3("live")
    finally:
        caches[1].with_name("aside").rename(caches[1])
    assert f"tier '{OTHER}' is encoded live: no encoder cache at" in live_log
    assert "are not read either: one batch mixes every tier" in live_log
    assert sorted(cached_losses) == sorted(live_losses) == [1, 2, 3]
    for step, loss in live_losses.items():
        assert cached_losses[step] == pytest.approx(loss, rel=1e-4), (cached_losses, live_losses)


def test_a_corrupted_cache_fails_verification_and_is_rebuilt(encoded, tmp_path):
    project, params, manifest = encoded
    plan = encode_plan(params, TIER, project)
    shard = plan.path / manifest.shards[0]["name"]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    assert miss_reason(plan.path, plan.key) is None  # the job's cheap check: sizes only
    why = miss_reason(plan.path, plan.key, verify=True)
    assert why and "fails verification" in why and "sha256" in why
    again, what = encode_tier(params, TIER, root=project)
    assert what.startswith("built (cache fails verification") and again.content_hash == manifest.content_hash
    assert miss_reason(plan.path, plan.key, verify=True) is None
    _, what = encode_tier(params, TIER, root=project)
    assert what == "up to date"
