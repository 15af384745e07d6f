"""Promotion to deployment on the session's trained chain (tests/support/chain.py): a registered Stage 3 version
is an MLflow pyfunc model (fresh process, `mlflow models serve`), and `motus serve` follows the champion alias:
a promotion swaps the new version in and a rollback swaps the old one back while a client keeps sending, with no
failed request; a version that fails its warm-up is never swapped in; bad requests are 4xx naming the field; the
closed-loop evaluation through the server reproduces the in-process one.

Every server here is a real process on 127.0.0.1, started and stopped by the test that needs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from motus.config import load_params
from motus.data.loader import denormalize_actions, frames_to_video, normalize
from motus.evaluate.export import load_export
from motus.evaluate.remote import PolicyClient, encode_image
from motus.track.registry import Registry

from ..support.chain import STAGE3
from ..support.servers import serve

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TIER = "target-aloha-transfer"
SEED = 1234


class Deployed:
    def __init__(self, chain, folder: Path):
        self.proj, self.runs = chain.proj, chain.runs
        self.uri = chain.fresh_uri(folder)
        self.folder = folder
        self.params = load_params(chain.proj / "params.yaml")
        self.registry = Registry(self.uri, self.params)
        self.client = mlflow.MlflowClient(self.uri)
        self.a = self.registry.register(self.runs["s3a"]).version
        self.b = self.registry.register(self.runs["s3b"]).version
        self.exported = load_export(self.runs["s3a"] / "export", self.params)

    def passing_eval(self, version: int, rate: float) -> None:
        exp = self.client.get_experiment_by_name("serve-test-eval") or None
        exp_id = exp.experiment_id if exp else self.client.create_experiment("serve-test-eval")
        run = self.client.create_run(exp_id)
        self.client.log_metric(run.info.run_id, "eval/success_rate", rate)
        self.client.set_terminated(run.info.run_id)
        self.client.set_model_version_tag(STAGE3, str(version), "motus.evaluation_run", run.info.run_id)
        assert self.registry.evaluate(STAGE3, version).passed

    def promote(self, version: int, rate: float) -> None:
        self.passing_eval(version, rate)
        self.registry.promote(STAGE3, version, actor="test")

    def env(self) -> dict[str, str]:
        # one compute thread, as in the test process: the same floating-point sums, so the same actions
        return {"MOTUS_TRACKING_URI": self.uri, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": self.uri,
                "MOTUS_SERVE_CACHE_DIR": str(self.folder / "serve-cache")}


@pytest.fixture(scope="module")
def deployed(chains, tmp_path_factory):
    d = Deployed(chains["sqlite"], tmp_path_factory.mktemp("deployed"))
    d.promote(d.a, 0.5)
    return d


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def observation(exported, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    space = exported.serving.space(TIER)
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 255, (*space.image_size, 3), dtype=np.uint8)
    norm = exported.normalization(TIER)
    state = np.asarray(norm["state"]["mean"], dtype=np.float32) + rng.normal(0, 0.05, space.state_dim).astype(
        np.float32)
    return frame, state, space.instruction


def sampled(exported, frame, state, instruction, seed: int) -> np.ndarray:
    """The reference: `model.sample("vla", ...)` called directly on the training inputs of one observation."""
    cfg, norm = exported.cfg, exported.normalization(TIER)
    st = normalize(state[None], norm["method"], norm.get("state"))
    batch = {"video": frames_to_video(frame[None], (cfg.height, cfg.width))[None], "actions": None,
             "state": torch.from_numpy(st), "instruction": [instruction]}
    inputs = exported.inputs(batch)
    obs = inputs["video_latents"][:, :, :1]
    latents = torch.cat([obs, obs.new_zeros(*obs.shape[:2], cfg.latent_shape[1] - 1, *obs.shape[3:])], dim=2)
    with torch.no_grad():
        out = exported.model.sample("vla", latents, inputs["text_embeds"], state=inputs.get("state"),
                                    understanding=inputs.get("understanding"),
                                    generator=torch.Generator().manual_seed(seed))
    return np.asarray(denormalize_actions(out.actions[0].float().numpy(), norm), dtype=np.float64)


PYFUNC = """
import json, sys
import mlflow, numpy as np
obs = json.loads(sys.stdin.read())
model = mlflow.pyfunc.load_model("models:/{name}@champion")
out = model.predict({{"image": np.asarray(obs["image"], dtype=np.uint8)[None],
                      "state": np.asarray(obs["state"], dtype=np.float32)[None],
                      "instruction": np.asarray([obs["instruction"]])}},
                    params={{"seed": obs["seed"], "tier": obs["tier"]}})
print(json.dumps({{"actions": out.tolist(), "signature": model.metadata.signature.to_dict()}}))
"""


def test_the_champion_is_a_pyfunc_model_in_a_fresh_process_and_behind_mlflow_models_serve(deployed, one_thread):
    frame, state, instruction = observation(deployed.exported)
    want = sampled(deployed.exported, frame, state, instruction, SEED)
    assert want.shape == (deployed.exported.cfg.action.chunk, 14) and np.isfinite(want).all()

    obs = {"image": frame.tolist(), "state": state.tolist(), "instruction": instruction, "seed": SEED, "tier": TIER}
    r = subprocess.run([sys.executable, "-c", PYFUNC.format(name=STAGE3)], input=json.dumps(obs), text=True,
                       capture_output=True, env={**_env(), **deployed.env()}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.asarray(got["actions"])[0], want, rtol=1e-5, atol=1e-5)
    inputs = json.loads(got["signature"]["inputs"])
    assert [(i["name"], i["tensor-spec"]["shape"]) for i in inputs] == [
        ("image", [-1, *deployed.exported.serving.space(TIER).image_size, 3]), ("state", [-1, 14]),
        ("instruction", [-1])]
    # the version's artifacts are the export plus the packaging: its export hash (what lineage checks) is unchanged
    ref = deployed.registry.version(STAGE3, deployed.a)
    assert ref.tags["motus.flavour"] == "python_function"
    fetched = deployed.registry.fetch(ref, deployed.folder / "fetched")
    assert (fetched / "MLmodel").is_file()

    command = lambda port: [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{STAGE3}@champion",  # noqa: E731
                            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # it starts `uvicorn` from PATH
    with serve(command, "/ping", deployed.folder / "mlflow-models-serve.log", env={**deployed.env(), "PATH": path},
               timeout=300) as url:
        body = {"inputs": {"image": [frame.tolist()], "state": [state.tolist()], "instruction": [instruction]},
                "params": {"seed": SEED, "tier": TIER}}
        answer = _post(url + "/invocations", body)
    np.testing.assert_allclose(np.asarray(answer["predictions"])[0], want, rtol=1e-5, atol=1e-5)


def _env() -> dict[str, str]:
    return dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")


def _post(url: str, body) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(deployed):
    """`motus serve motus-aloha@champion`, polling the alias every 0.2 s."""
    command = lambda port: [str(BIN / "motus"), "serve", f"{STAGE3}@champion", "--port", str(port),  # noqa: E731
                            "--poll", "0.2", "--log-level", "warning"]
    with serve(command, "/healthz", deployed.folder / "motus-serve.log", env=deployed.env(), timeout=300) as url:
        yield url


def test_the_server_answers_like_sample_and_refuses_bad_requests_by_field(deployed, server, one_thread):
    frame, state, instruction = observation(deployed.exported, seed=1)
    want = sampled(deployed.exported, frame, state, instruction, SEED)
    client = PolicyClient(server)
    body = {"image": encode_image(frame), "state": state.tolist(), "instruction": instruction, "tier": TIER,
            "seed": SEED}
    answer = client.act(body)
    assert answer["version"] == deployed.a and answer["hold"] == deployed.exported.spec.downsample
    np.testing.assert_allclose(np.asarray(answer["actions"]), want, rtol=1e-5, atol=1e-5)

    meta = client.metadata()["serving"]
    assert meta["export_hash"] == deployed.registry.version(STAGE3, deployed.a).tags["motus.export_hash"]
    assert meta["lineage"]["run_id"] == deployed.exported.lineage.run_id
    assert {s["tier"] for s in meta["action_spaces"]} == {TIER, "target-aloha-insertion"}
    assert meta["normalization"][TIER]["method"] == deployed.exported.normalization(TIER)["method"]

    bad = [({**body, "image": encode_image(frame[:, :-2])}, "image"),
           ({**body, "state": state.tolist()[:-1]}, "state"),
           ({**body, "instruction": ["pick"]}, "instruction"),
           ({k: v for k, v in body.items() if k != "tier"}, "tier"),
           ({**body, "images": {"top": encode_image(frame), "left": encode_image(frame)}}, "images")]
    for request, field in bad:
        req = urllib.request.Request(server + "/act", data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 422
        err = json.loads(e.value.read())
        assert err["field"] == field and err["expected"], err
    # the websocket answers a bad message with its error and keeps the stream open
    from websockets.sync.client import connect

    with connect(server.replace("http://", "ws://") + "/stream") as ws:
        ws.send(json.dumps({**body, "state": [0.0]}))
        err = json.loads(ws.recv())
        assert err["status"] == 422 and err["field"] == "state" and "14 numbers" in err["expected"]
        ws.send(json.dumps(body))
        ok = json.loads(ws.recv())
        assert ok["status"] == 200 and np.allclose(ok["actions"], want, rtol=1e-5, atol=1e-5)
    status, text = _get(server + "/metrics")
    assert status == 200
    assert 'motus_serve_requests_total{mode="vla",outcome="bad-request",transport="http"} 5.0' in text
    assert f'motus_serve_version{{model="{STAGE3}",version="{deployed.a}"}} 1.0' in text
    assert "motus_serve_latency_quantile_seconds" in text
    assert "motus_serve_batch_size_count 2.0" in text  # one forward pass per good request (max_batch 1)


def test_evaluation_through_the_server_reproduces_the_in_process_closed_loop(deployed, server, one_thread,
                                                                            monkeypatch):
    from motus.evaluate import evaluate_model
    from motus.evaluate.remote import ServerError

    monkeypatch.chdir(deployed.proj)  # params' data root is the project's

    kw = dict(modes=["vla"], tasks=["transfer_cube"], seeds=[1000], max_steps=24, windows_per_tier=1, draws=1,
              workers=1, progress=False, video_episodes=1)
    export = deployed.runs["s3a"] / "export"
    local = evaluate_model(deployed.params, export, **kw)
    remote = evaluate_model(deployed.params, export, server_url=server, **kw)
    assert remote.settings["via_server"] == server
    assert remote.metrics["eval/success_rate"] == local.metrics["eval/success_rate"]
    (name,) = [k for k in local.videos if k.startswith("vla_")]
    # the same rendered frames at every step: the same actions, sent through the server and back
    assert np.array_equal(remote.videos[name], local.videos[name])
    assert [r["plans"] for r in remote.rollouts] == [r["plans"] for r in local.rollouts]
    # a server serving another version is refused before any rollout
    with pytest.raises(ServerError, match="not the export being evaluated"):
        evaluate_model(deployed.params, deployed.runs["s3b"] / "export", server_url=server, **kw)


def test_promotion_and_rollback_swap_the_served_version_under_continuous_requests(deployed, server):
    frame, state, instruction = observation(deployed.exported, seed=2)
    body = {"image": encode_image(frame), "state": state.tolist(), "instruction": instruction, "tier": TIER}
    seen: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def client_loop() -> None:
        c = PolicyClient(server)
        while not stop.is_set():
            try:
                seen.append(c.act(body)["version"])
            except Exception as e:  # noqa: BLE001 - counted: the assertion is that there are none
                failures.append(repr(e))

    def wait_for(version: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (seen and seen[-1] == version):
            time.sleep(0.05)
        assert seen and seen[-1] == version, f"still answering v{seen[-1] if seen else None}"

    thread = threading.Thread(target=client_loop)
    thread.start()
    try:
        wait_for(deployed.a)
        deployed.promote(deployed.b, 0.6)
        wait_for(deployed.b)
        deployed.registry.rollback(STAGE3, actor="test")
        wait_for(deployed.a)
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(60)
    assert failures == []
    # every answer came from the champion of its moment: a, then b, then a again, nothing interleaved
    runs = [v for i, v in enumerate(seen) if i == 0 or seen[i - 1] != v]
    assert runs == [deployed.a, deployed.b, deployed.a], runs
    status, text = _get(server + "/metrics")
    assert "motus_serve_swaps_total 3.0" in text  # the first load, the promotion, the rollback
    assert _get(server + "/healthz")[0] == 200


def test_a_version_that_fails_warm_up_is_not_swapped_in(deployed, tmp_path):
    from safetensors.torch import load_file, save_file

    from motus.serve.deployment import Deployment, Target
    from motus.serve.served import Expectation

    # the candidate alias is the newest registration; a broken copy of a export (weights NaN) becomes it
    broken = tmp_path / "broken"
    shutil.copytree(deployed.runs["s3a"] / "export", broken)
    weights = load_file(str(broken / "model.safetensors"))
    key = next(k for k in weights if k.startswith("action.") and weights[k].is_floating_point())
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(broken / "model.safetensors"))

    dep = Deployment(Target.parse(f"{STAGE3}@candidate"), deployed.registry, cache_dir=tmp_path / "cache",
                     poll_s=60)
    assert "serving" in dep.refresh()
    before = dep.current
    assert before.version == deployed.registry.aliases(STAGE3)["candidate"]
    bad = deployed.registry.register(broken).version
    assert deployed.registry.aliases(STAGE3)["candidate"] == bad
    said = dep.refresh()
    assert "non-finite actions" in said and f"still serving {before.label}" in said
    assert dep.current is before
    assert dep.metadata()["last_refusal"]["version"] == bad
    assert dep.refresh().startswith(f"v{bad} stays refused")  # not loaded again at every poll
    text = dep.metrics.render().decode()
    assert 'motus_serve_refused_versions_total{reason="warm-up"} 1.0' in text

    # a deployment for other robots refuses the version at load, whatever its weights
    other = Deployment(Target.parse(f"{STAGE3}/{before.version}"), deployed.registry, cache_dir=tmp_path / "cache",
                       expect=Expectation(action_dim=7))
    assert "7" in other.refresh() and other.current is None


def test_only_policies_with_their_contracts_are_loaded_and_an_unaudited_alias_is_not_followed(deployed, tmp_path):
    from motus.contracts import LineageRecord
    from motus.serve.deployment import Deployment, Target
    from motus.serve.served import LoadRefused, ServedVersion

    # a Stage 2 export acts in no robot's units: it has no serving contract
    with pytest.raises(LoadRefused, match="no serving contract"):
        ServedVersion.load(deployed.runs["s2"] / "export")
    # a policy whose lineage lost an action space's normalisation could not give the robot its units back
    stripped = tmp_path / "stripped"
    shutil.copytree(deployed.runs["s3a"] / "export", stripped)
    record = LineageRecord.read(stripped)
    norm = {k: v for k, v in record.normalization.items() if k != TIER}
    record.with_updates(normalization=norm).write(stripped)
    with pytest.raises(LoadRefused, match=f"'{TIER}' has no normalisation contract"):
        ServedVersion.load(stripped)

    # the champion moved by hand (no audit entry): the deployment keeps what it serves and says why
    dep = Deployment(Target.parse(f"{STAGE3}@champion"), deployed.registry, cache_dir=tmp_path / "cache", poll_s=60)
    assert "serving" in dep.refresh()
    serving = dep.current
    other = deployed.b if serving.version == deployed.a else deployed.a
    deployed.client.set_registered_model_alias(STAGE3, "champion", str(other))
    try:
        said = dep.refresh()
        assert "the platform will not use it" in said and dep.current is serving
        assert 'motus_serve_registry_errors_total{kind="unverified"} 1.0' in dep.metrics.render().decode()
    finally:
        deployed.registry.repair(STAGE3, actor="test")
    assert dep.refresh() == "unchanged" and dep.current is serving


def test_a_stage1_video_model_is_a_pyfunc_model_that_imagines_frames(deployed, one_thread, monkeypatch):
    from motus.serve.request import BadRequest, parse_request
    from motus.serve.served import ServedVersion

    s1 = deployed.registry.register(deployed.runs["s1"])
    assert s1.tags["motus.flavour"] == "python_function"
    assert deployed.registry.register(deployed.runs["s2"]).tags["motus.flavour"] == ""  # latent actions: no units
    served = ServedVersion.load(deployed.runs["s1"] / "export")
    contract = served.contract
    assert contract.modes == ("vgm",) and not contract.is_policy and all(not s.acts for s in contract.spaces)
    space = contract.spaces[0]
    frame = np.random.default_rng(3).integers(0, 255, (*space.image_size, 3), dtype=np.uint8)
    # the store through the environment, as a serving process gets it: `mlflow.set_tracking_uri` /
    # `set_registry_uri` would leave a process-wide registry URI behind for every later MlflowClient of this worker
    monkeypatch.setenv("MLFLOW_TRACKING_URI", deployed.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", deployed.uri)
    model = mlflow.pyfunc.load_model(f"models:/{s1.name}/{s1.version}")
    frames = model.predict({"image": frame[None], "instruction": np.asarray([space.instruction or "the scene"])},
                           params={"seed": 11, "tier": space.tier})
    f = deployed.exported.cfg.num_frames - 1
    assert frames.dtype == np.uint8 and frames.shape == (1, f, *space.image_size, 3)
    # the same frames `motus serve` would answer for this observation and seed
    answer = served.act([parse_request({"image": frame.tolist(), "instruction": space.instruction or "the scene",
                                        "tier": space.tier, "seed": 11}, contract)])[0]
    assert "actions" not in answer and len(answer["frames"]) == f
    from motus.serve.request import decode_image  # the answer's frames, read back from the wire form

    assert np.array_equal(np.stack([decode_image(x, "frames", space.image_size) for x in answer["frames"]]), frames[0])
    with pytest.raises(BadRequest) as e:  # a video model reads no state
        parse_request({"image": frame.tolist(), "instruction": "x", "tier": space.tier, "state": [0.0] * 14}, contract)
    assert e.value.field == "state"


def test_the_serving_precision_is_configuration_and_bf16_runs_on_this_cpu(deployed):
    from motus.serve.served import LoadRefused, ServedVersion

    export = deployed.runs["s3a"] / "export"
    fp32 = ServedVersion.load(export)  # auto: fp32 on a CPU
    bf16 = ServedVersion.load(export, precision="bf16")  # what auto picks on CUDA, run here by asking for it
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert bf16.metadata()["precision"] == "bf16" and bf16.metadata()["trained_precision"] == "fp32"
    probe = fp32.probe(TIER)
    a = np.asarray(fp32.act([probe])[0]["actions"])
    b = np.asarray(bf16.act([probe])[0]["actions"])
    assert a.shape == b.shape and np.isfinite(b).all()
    assert not np.array_equal(a, b)  # the forward really ran in bf16
    with pytest.raises(LoadRefused, match="serving precision: 'fp16' is not a precision"):
        ServedVersion.load(export, precision="fp16")
