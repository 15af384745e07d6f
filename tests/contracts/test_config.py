"""Contract tests for motus/config.py and `motus config`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from motus.cli.config_cmd import config_app
from motus.config import (
    ConfigError,
    Params,
    Settings,
    config_hash,
    get_settings,
    load_params,
    resolved_dict,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "params.yaml"

# A small but complete file: two tiers, two chained stages, a gate, a pool.
GOOD = """
project: {name: test, seed: 3}
model: {preset: tiny}
tiers:
  ego: {level: 2, embodiment: human, source: {kind: simulator}}
  robot: {level: 6, embodiment: aloha, source: {kind: simulator}, action_dim: 14}
stages:
  first:
    stage: 1
    tiers: {ego: 1.0}
    trains: [video]
    action_source: none
    steps: 2
    batch_size: 1
    lr: 1.0e-4
    registered_model: vgm
  last:
    stage: 3
    tiers: {robot: 1.0}
    trains: [video, action, understanding]
    action_source: real
    parent: vgm
    steps: 2
    batch_size: 1
    lr: 1.0e-4
    registered_model: policy
gates:
  policy:
    rules: [{metric: val/action_loss, comparator: "<=", threshold: 2.0}]
pools:
  h100: {gpu: H100, gpus_per_node: 8, queue: motus-h100}
"""


def write(tmp_path: Path, text: str, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def good_data() -> dict:
    return yaml.safe_load(GOOD)


def errors_of(tmp_path: Path, data_or_text: dict | str) -> ConfigError:
    text = data_or_text if isinstance(data_or_text, str) else yaml.safe_dump(data_or_text)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    return info.value


def keys(err: ConfigError) -> list[str]:
    return [key for key, _ in err.errors]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MOTUS_* variable or .env file from the developer's shell leaks into a test."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("MOTUS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------------------- the shipped file


def test_shipped_params_validate() -> None:
    params = load_params(SHIPPED)
    assert params.model.preset == "tiny"
    assert {tier.level for tier in params.tiers.values()} == {2, 3, 4, 5, 6}
    assert [params.stages[name].stage for name in ("stage1", "stage2", "stage3")] == [1, 2, 3]
    assert params.stages["stage1"].parent is None
    assert params.stages["stage2"].parent == params.stages["stage1"].registered_model == "motus-vgm"
    assert params.stages["stage3"].parent == params.stages["stage2"].registered_model == "motus-latent-action"
    assert params.stages["stage3"].registered_model == "motus-aloha"
    assert set(params.gates) == {"motus-vgm", "motus-latent-action", "motus-aloha", params.latent_action.registered_model}
    assert {pool.gpu for pool in params.pools.values()} == {"A100", "H100"}
    for stage in params.stages.values():
        assert stage.betas == (0.9, 0.95)
        assert stage.weight_decay == 0.01


def test_stage_levels_follow_the_pyramid() -> None:
    params = load_params(SHIPPED)

    def levels(stage: str) -> set[int]:
        return {params.tiers[t].level for t in params.stages[stage].tiers}

    assert levels("stage1") == {2, 3, 5}
    assert levels("stage2") == {2, 3, 4, 5}
    assert levels("stage3") == {6}


# ---------------------------------------------------------------------------------------------- defaults


def test_an_explicit_empty_mapping_gives_defaults(tmp_path: Path) -> None:
    """`{}` says "every default" on purpose; an empty file is refused (below)."""
    params = load_params(write(tmp_path, "{}\n"))
    assert params == Params()
    assert params.project.name == "motus"
    assert params.project.seed == 0
    assert params.model.preset == "tiny"
    assert params.model.action_dim == 14
    assert params.model.flow.timestep_sampler == "uniform_shift"
    assert params.tiers == {} and params.stages == {} and params.gates == {} and params.pools == {}


def test_stage_defaults_are_filled_in(tmp_path: Path) -> None:
    stage = load_params(write(tmp_path, GOOD)).stages["first"]
    assert stage.betas == (0.9, 0.95)
    assert stage.weight_decay == 0.01
    assert stage.zero_stage == 2
    assert stage.grad_clip == 1.0
    assert stage.warmup_steps == 0
    assert stage.video_lr is None
    assert stage.parent is None


def test_default_path_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # cwd is tmp_path (fixture): ./params.yaml is the default ...
    write(tmp_path, "project: {name: from-cwd}")
    assert load_params().project.name == "from-cwd"
    # ... and MOTUS_PARAMS points elsewhere.
    other = write(tmp_path, "project: {name: from-env}", name="other.yaml")
    monkeypatch.setenv("MOTUS_PARAMS", str(other))
    assert load_params().project.name == "from-env"


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_key_is_an_error_with_its_path(tmp_path: Path) -> None:
    data = good_data()
    data["stages"]["first"]["lerning_rate"] = 0.1
    data["modle"] = {}
    err = errors_of(tmp_path, data)
    assert "stages.first.lerning_rate" in keys(err)
    assert "modle" in keys(err)
    assert "stages.first.lerning_rate: Extra inputs are not permitted" in str(err)


def test_all_bad_values_reported_with_key_paths(tmp_path: Path) -> None:
    data = good_data()
    data["stages"]["first"]["lr"] = 0
    data["stages"]["first"]["steps"] = 0
    data["stages"]["last"]["betas"] = [0.9, 1.5]
    data["stages"]["last"]["zero_stage"] = 4
    data["model"]["preset"] = "huge"
    data["model"]["flow"] = {"logit_std": -1}
    data["tiers"]["ego"]["level"] = 9
    data["pools"]["h100"]["gpu"] = "V100"
    err = errors_of(tmp_path, data)
    expected = [
        "stages.first.lr",
        "stages.first.steps",
        "stages.last.betas.1",
        "stages.last.zero_stage",
        "model.preset",
        "model.flow.logit_std",
        "tiers.ego.level",
        "pools.h100.gpu",
    ]
    for key in expected:
        assert key in keys(err), key
    lines = str(err).splitlines()
    assert len(lines) == len(err.errors) >= len(expected)
    assert f"{err.path}: stages.first.lr: Input should be greater than 0" in lines
    assert all(line.startswith(f"{err.path}: ") for line in lines)


def test_error_message_names_the_file_as_given(tmp_path: Path) -> None:
    write(tmp_path, "stages: {s: {stage: 1}}")
    with pytest.raises(ConfigError) as info:
        load_params("params.yaml")  # relative to cwd = tmp_path
    assert str(info.value).startswith("params.yaml: stages.s.")


def test_stage_with_unknown_tier(tmp_path: Path) -> None:
    data = good_data()
    data["stages"]["first"]["tiers"]["ego-vidoe"] = 0.5
    err = errors_of(tmp_path, data)
    assert keys(err) == ["stages.first.tiers.ego-vidoe"]
    assert "unknown tier" in str(err)


def test_placement_pools_must_exist_and_the_fallback_differ(tmp_path: Path) -> None:
    data = good_data()
    data["pools"] = {"h100": {"gpu": "H100", "gpus_per_node": 8}, "a100": {"gpu": "A100", "gpus_per_node": 8}}
    data["stages"]["first"]["cluster"] = {"pool": "h100", "fallback": "a10"}
    data["stages"]["last"]["cluster"] = {"pool": "a100", "fallback": "a100"}
    err = errors_of(tmp_path, data)
    assert keys(err) == ["stages.first.cluster.fallback", "stages.last.cluster.fallback"]
    assert "unknown pool 'a10' (known pools: a100, h100)" in str(err)
    assert "the fallback pool is the job's own pool" in str(err)


def test_gate_rules_that_could_never_be_judged_are_config_errors(tmp_path: Path) -> None:
    data = good_data()
    data["evaluation"] = {"seeds": 4, "tasks": ["transfer_cube", "insertion"]}
    data["gates"]["policy"]["rules"] = [
        {"metric": "eval/vla_action_mse", "comparator": "<=", "relative_to": "eval/floor_zero_actoin_mse"},
        {"metric": "eval/pick_place/success_rate", "comparator": ">=", "threshold": 0.5},
        {"metric": "eval/success_rate", "comparator": ">=", "threshold": 0.5, "statistic": "wilson",
         "min_episodes": 20},
        {"metric": "eval/transfer_cube/success_rate", "comparator": ">=", "threshold": 0.8,
         "statistic": "clopper-pearson"},
        {"metric": "eval/success_rate", "comparator": ">=", "threshold": 0.2, "statistic": "wilson"},  # fine
        {"metric": "eval/success_rate", "comparator": ">=", "threshold": 1.0, "statistic": "clopper-pearson"},
        {"metric": "val/vla_mse", "comparator": "<=", "relative_to": "val/floor_zero_action_mse", "factor": 0.8},
        {"metric": "lam/probe_r2/aloha", "comparator": ">=", "relative_to": "lam/untrained_probe_r2/aloha"},  # fine
        {"metric": "lam/probe", "comparator": ">=", "threshold": 0.3},
    ]
    err = errors_of(tmp_path, data)
    found = dict(err.errors)
    assert list(found) == ["gates.policy.rules.0.relative_to", "gates.policy.rules.1.metric",
                           "gates.policy.rules.2.min_episodes", "gates.policy.rules.3.threshold",
                           "gates.policy.rules.5.threshold", "gates.policy.rules.6.metric",
                           "gates.policy.rules.8.metric"]
    assert "the latent-action job does not log lam/probe (it logs lam/ probe_r2, recon_psnr" in \
        found["gates.policy.rules.8.metric"]
    assert "stage jobs do not log val/vla_mse" in found["gates.policy.rules.6.metric"]
    assert "no number of episodes reaches it" in found["gates.policy.rules.5.threshold"]  # an interval never hits 1
    assert "does not report eval/floor_zero_actoin_mse" in found["gates.policy.rules.0.relative_to"]
    assert "task 'pick_place' is not rolled out" in found["gates.policy.rules.1.metric"]
    assert "8 episodes (evaluation.seeds 4 x 2 task(s)) < min_episodes 20" in found["gates.policy.rules.2.min_episodes"]
    # 4 seeds of one task: n/n has the lower bound 0.025 ** (1/n): 0.398 at 4, >= 0.8 from 17
    assert "even 4/4 successes give a 95% clopper-pearson lower bound of 0.398 < 0.8" in \
        found["gates.policy.rules.3.threshold"] and "needs >= 17 episodes" in found["gates.policy.rules.3.threshold"]


def test_a_statistical_rule_needs_a_rate_judged_upwards(tmp_path: Path) -> None:
    data = good_data()
    data["gates"]["policy"]["rules"] = [
        {"metric": "val/action_loss", "comparator": "<=", "threshold": 2.0, "statistic": "wilson"},
        {"metric": "eval/success_rate", "comparator": "<=", "threshold": 0.5, "statistic": "wilson"},
        {"metric": "eval/success_rate", "comparator": ">=", "threshold": 50, "statistic": "wilson"},
        {"metric": "eval/vla_action_mse", "comparator": "<="},
    ]
    err = str(errors_of(tmp_path, data))
    assert "statistic wilson applies to success rates (eval/..._success_rate), not val/action_loss" in err
    assert "comparator >= or >, not <=" in err and "threshold lies in [0, 1], got 50" in err
    assert "a rule must set threshold, relative_to or max_regression" in err


def test_cross_section_errors_reported_with_structural_errors(tmp_path: Path) -> None:
    data = good_data()
    data["stages"]["first"]["tiers"]["nope"] = 1.0
    data["stages"]["last"]["lr"] = -1
    err = errors_of(tmp_path, data)
    assert "stages.first.tiers.nope" in keys(err)
    assert "stages.last.lr" in keys(err)


def test_parent_must_be_registered_by_another_stage(tmp_path: Path) -> None:
    data = good_data()
    data["stages"]["last"]["parent"] = "vmg"
    err = errors_of(tmp_path, data)
    assert keys(err) == ["stages.last.parent"]
    data["stages"]["last"]["parent"] = "policy"  # its own model
    assert keys(errors_of(tmp_path, data)) == ["stages.last.parent"]


def test_parent_cycle_is_an_error(tmp_path: Path) -> None:
    data = good_data()
    data["stages"]["first"]["parent"] = "policy"
    err = errors_of(tmp_path, data)
    assert "stages.first.parent" in keys(err)
    assert "cycle" in str(err)


def test_real_actions_need_labelled_tiers(tmp_path: Path) -> None:
    data = good_data()
    data["stages"]["last"]["tiers"]["ego"] = 1.0
    err = errors_of(tmp_path, data)
    assert keys(err) == ["stages.last.tiers.ego"]


def test_training_actions_needs_an_action_source(tmp_path: Path) -> None:
    data = good_data()
    data["stages"]["first"]["trains"] = ["video", "action"]
    err = errors_of(tmp_path, data)
    assert keys(err) == ["stages.first"]
    assert "action_source" in str(err)


def test_gate_rule_needs_threshold_or_max_regression(tmp_path: Path) -> None:
    data = good_data()
    data["gates"]["policy"]["rules"].append({"metric": "eval/success_rate", "comparator": ">="})
    err = errors_of(tmp_path, data)
    assert keys(err) == ["gates.policy.rules.1"]
    assert "threshold" in str(err) and "max_regression" in str(err)
    # Either bound alone is enough.
    data["gates"]["policy"]["rules"][1]["max_regression"] = 0.05
    assert load_params(write(tmp_path, yaml.safe_dump(data))).gates["policy"].rules[1].threshold is None


def test_gate_for_unregistered_model(tmp_path: Path) -> None:
    data = good_data()
    data["gates"]["polcy"] = {"rules": []}
    err = errors_of(tmp_path, data)
    assert keys(err) == ["gates.polcy"] and "neither a stage nor latent_action registers" in str(err)
    # the latent-action VAE's registered model is gated like a stage's, and may not also be a stage's
    del data["gates"]["polcy"]
    data["gates"]["motus-lam"] = {"rules": [{"metric": "lam/probe_r2", "comparator": ">=", "threshold": 0.0}]}
    assert load_params(write(tmp_path, yaml.safe_dump(data))).gates["motus-lam"].rules[0].metric == "lam/probe_r2"
    data["latent_action"] = {"registered_model": "policy"}
    assert keys(errors_of(tmp_path, data)) == ["latent_action.registered_model", "gates.motus-lam"]


def test_full_preset_needs_weights(tmp_path: Path) -> None:
    data = good_data()
    data["model"] = {"preset": "full", "weights": {"vae": "/models/vae"}}
    err = errors_of(tmp_path, data)
    assert keys(err) == ["model.weights.video", "model.weights.vlm", "model.weights.text"]
    data["model"]["weights"] = {"video": "/m/wan", "vae": "/m/vae", "vlm": "/m/qwen", "text": "/m/umt5"}
    assert load_params(write(tmp_path, yaml.safe_dump(data))).model.weights.vlm == Path("/m/qwen")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    err = errors_of(tmp_path, "project:\n  name: motus\n  seed: [0\nmodel: {}\n")
    assert len(err.errors) == 1
    assert "line 4" in str(err)
    assert str(err).startswith(str(tmp_path / "params.yaml"))
    err = errors_of(tmp_path, "project:\n  name: a: b\n")
    assert "line 2, column" in str(err)


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    err = errors_of(tmp_path, "project: {name: a}\nmodel: {}\nproject: {name: b}\n")
    assert "duplicate key 'project'" in str(err)
    assert "line 3" in str(err)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ConfigError) as info:
        load_params(missing)
    assert "not found" in str(info.value)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    err = errors_of(tmp_path, text)
    assert "top level must be a mapping" in str(err)


def test_params_model_rejects_inconsistency_directly() -> None:
    data = good_data()
    data["stages"]["first"]["tiers"] = {"nope": 1.0}
    with pytest.raises(ValidationError):
        Params.model_validate(data)


# -------------------------------------------------------------------------------------- resolved config + hash


def test_resolved_dict_is_json_friendly(tmp_path: Path) -> None:
    data = good_data()
    data["model"] = {"preset": "full", "weights": {"video": "/m/wan", "vae": "/m/vae", "vlm": "/m/qwen", "text": "/m/umt5"}}
    resolved = resolved_dict(load_params(write(tmp_path, yaml.safe_dump(data))))
    assert json.loads(json.dumps(resolved)) == resolved
    assert resolved["model"]["weights"]["video"] == "/m/wan"
    assert resolved["stages"]["first"]["betas"] == [0.9, 0.95]
    assert resolved["model"]["flow"]["inference_steps"] == 10


def test_config_hash_stable_under_key_order(tmp_path: Path) -> None:
    data = good_data()

    def reversed_keys(value):
        if isinstance(value, dict):
            return {k: reversed_keys(value[k]) for k in reversed(list(value))}
        if isinstance(value, list):
            return [reversed_keys(v) for v in value]
        return value

    a = load_params(write(tmp_path, yaml.safe_dump(data, sort_keys=False), "a.yaml"))
    b = load_params(write(tmp_path, yaml.safe_dump(reversed_keys(data), sort_keys=False), "b.yaml"))
    assert list(a.stages) != list(b.stages)  # the files really differ in order
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 64 and int(config_hash(a), 16) >= 0

    # Writing a default out explicitly is the same configuration.
    data_explicit = good_data()
    data_explicit["stages"]["first"]["weight_decay"] = 0.01
    c = load_params(write(tmp_path, yaml.safe_dump(data_explicit), "c.yaml"))
    assert config_hash(c) == config_hash(a)

    data["stages"]["first"]["lr"] = 2.0e-4
    d = load_params(write(tmp_path, yaml.safe_dump(data), "d.yaml"))
    assert config_hash(d) != config_hash(a)


# ------------------------------------------------------------------------------------------------ settings


def test_settings_defaults() -> None:
    settings = get_settings()
    assert settings.params_file == Path("params.yaml")
    assert settings.tracking_uri == "sqlite:///mlflow.db"
    assert settings.data_remote == ".dvc-remote"
    assert settings.s3_endpoint_url is None
    assert settings.launcher == "local"
    assert settings.profile == "local"


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOTUS_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MOTUS_LAUNCHER", "kubernetes")
    monkeypatch.setenv("MOTUS_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("MOTUS_PARAMS", "prod.yaml")
    settings = get_settings()
    assert settings.tracking_uri == "http://mlflow:5000"
    assert settings.launcher == "kubernetes"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.params_file == Path("prod.yaml")


def test_settings_from_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MOTUS_PROFILE=production\nMOTUS_DATA_REMOTE=s3://bucket/dvc\n")
    settings = get_settings()
    assert settings.profile == "production"
    assert settings.data_remote == "s3://bucket/dvc"


def test_settings_reject_invalid_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOTUS_LAUNCHER", "slurm")
    with pytest.raises(ValidationError):
        Settings()
    with pytest.raises(ConfigError) as info:
        get_settings()
    assert info.value.path == "environment"
    assert [key for key, _ in info.value.errors] == ["MOTUS_LAUNCHER"]
    assert str(info.value).startswith("environment: MOTUS_LAUNCHER: ")


# ----------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(params=["config_app", "motus.cli.app"])
def invoke(request):
    """Run `motus config ...` through the sub-app itself and through the `motus` entry point's app."""
    if request.param == "config_app":
        prefix, app = [], config_app
    else:
        from motus.cli import app

        prefix = ["config"]
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, [*prefix, *args])

    return run


def test_cli_validate_ok(invoke) -> None:
    result = invoke("validate", "--params", str(SHIPPED))
    assert result.exit_code == 0, result.output
    assert "ok" in result.output
    assert "preset tiny, 6 tiers, 3 stages, 4 gates, 2 pools" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_validate_default_path(invoke, tmp_path: Path) -> None:
    write(tmp_path, GOOD)  # cwd is tmp_path
    result = invoke("validate")
    assert result.exit_code == 0, result.output
    assert "2 tiers, 2 stages, 1 gates, 1 pools" in result.output


def test_cli_validate_reports_every_error(invoke, tmp_path: Path) -> None:
    data = good_data()
    data["stages"]["first"]["lr"] = 0
    data["stages"]["first"]["tiers"]["missing"] = 1.0
    data["pools"]["h100"]["gpus"] = 8
    path = write(tmp_path, yaml.safe_dump(data))
    result = invoke("validate", "--params", str(path))
    assert result.exit_code == 1
    assert f"{path}: stages.first.lr: Input should be greater than 0" in result.output
    assert "stages.first.tiers.missing" in result.output
    assert "pools.h100.gpus" in result.output
    assert "3 problems" in result.output


def test_cli_validate_missing_file(invoke, tmp_path: Path) -> None:
    result = invoke("validate", "--params", str(tmp_path / "absent.yaml"))
    assert result.exit_code == 1
    assert "absent.yaml" in result.output and "not found" in result.output


def test_cli_validate_reports_bad_environment(invoke, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOTUS_LAUNCHER", "slurm")
    result = invoke("validate", "--params", str(SHIPPED))
    assert result.exit_code == 1
    assert "MOTUS_LAUNCHER" in result.output


def test_cli_show_yaml(invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOTUS_TRACKING_URI", "http://mlflow:5000")
    path = write(tmp_path, GOOD)
    result = invoke("show", "--params", str(path))
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    params = load_params(path)
    assert shown["config_hash"] == config_hash(params)
    assert shown["params"] == resolved_dict(params)
    # Defaults that the file never wrote are filled in.
    assert shown["params"]["stages"]["first"]["weight_decay"] == 0.01
    assert shown["params"]["model"]["flow"]["shift"] == 5.0
    assert shown["settings"]["tracking_uri"] == "http://mlflow:5000"
    assert shown["settings"]["launcher"] == "local"


def test_cli_show_json(invoke) -> None:
    result = invoke("show", "--params", str(SHIPPED), "--format", "json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["config_hash"] == config_hash(load_params(SHIPPED))
    assert shown["params"]["model"]["preset"] == "tiny"
    assert set(shown["settings"]) >= {"tracking_uri", "data_remote", "launcher", "profile", "params_file"}


def test_cli_show_invalid_file_fails(invoke, tmp_path: Path) -> None:
    path = write(tmp_path, "stages: {s: {stage: 7}}")
    result = invoke("show", "--params", str(path))
    assert result.exit_code == 1
    assert "stages.s.stage" in result.output


def test_validate_reports_model_room_problems(tmp_path):
    """Preset overrides and weight paths are checked by the model room, with their key paths."""
    from typer.testing import CliRunner

    from motus.cli import app

    bad = tmp_path / "params.yaml"
    bad.write_text(
        "model:\n"
        "  preset: tiny\n"
        "  overrides: {action: {num_layers: 7}}\n"
        f"  weights: {{vlm: {tmp_path / 'missing-qwen'}}}\n"
    )
    result = CliRunner().invoke(app, ["config", "validate", "--params", str(bad)])
    assert result.exit_code == 1
    out = result.output
    assert "model.weights.vlm:" in out and "missing-qwen" in out
    assert "model.overrides: action.num_layers=7 must equal video.num_layers=2" in out


def test_model_section_builds_the_network_config():
    from motus.config import load_params
    from motus.model.presets import config_from_params

    params = load_params(REPO / "params.yaml")
    cfg = config_from_params(params.model)
    assert cfg.preset == params.model.preset
    assert cfg.action.action_dim == params.model.action_dim
    assert cfg.flow.shift == params.model.flow.shift


def test_one_stage_resolver_for_the_cli_the_launchers_and_the_worker():
    from motus.config import stage_key

    params = load_params(SHIPPED)
    assert stage_key(params, 3) == stage_key(params, "3") == stage_key(params, "stage3") == "stage3"
    assert stage_key(params, "latent-action") == "latent-action"
    with pytest.raises(ValueError, match="params.yaml: stages: no stage '9'"):
        stage_key(params, 9)


def test_numbers_that_cannot_be_meant_an_empty_file_and_an_unknown_reader_are_named_errors(tmp_path: Path) -> None:
    """The five cases a campaign found accepted: each an error naming its key at load (`motus config validate`)."""
    data = good_data()
    data["stages"]["first"]["steps"] = 1e30
    data["stages"]["first"]["lr"] = float("inf")  # YAML's 1e400
    data["stages"]["last"]["steps"] = True
    data["tiers"]["ego"]["source"]["kind"] = "ftp"
    err = errors_of(tmp_path, yaml.safe_dump(data).replace(".inf", "1e400"))
    found = dict(err.errors)
    assert set(found) == {"stages.first.steps", "stages.first.lr", "stages.last.steps", "tiers.ego.source.kind"}
    assert "1e+30 is beyond any count a job could reach" in found["stages.first.steps"]
    assert "finite" in found["stages.first.lr"]
    assert "expected a number, got the boolean true" in found["stages.last.steps"]
    assert "no reader for source kind 'ftp' (readers: simulator, lerobot" in found["tiers.ego.source.kind"]
    for text in ("", "# only a comment\n"):
        err = errors_of(tmp_path, text)
        assert "the file is empty" in str(err) and "motus config show" in str(err)
    data = good_data()
    data["stages"]["first"]["steps"] = 2.0  # a whole number written as a float is still the count it says
    assert load_params(write(tmp_path, yaml.safe_dump(data))).stages["first"].steps == 2


def test_every_source_kind_the_config_accepts_has_a_reader() -> None:
    from motus.contracts import SOURCE_KINDS
    from motus.data.ingest import SOURCE_KINDS as READERS

    assert set(SOURCE_KINDS) == set(READERS)


def test_masking_hides_credentials_and_nothing_else() -> None:
    from motus.contracts import mask_secrets

    env = {"MOTUS_TRACKING_URI": "http://svc:pw-1234@mlflow:5000", "AWS_SECRET_ACCESS_KEY": "aws-secret-9",
           "HF_TOKEN": "hf_abc123", "X_API_KEY": "key-value-7", "TOKENIZERS_PARALLELISM": "false",
           "MOTUS_TOKEN_REFRESH": "true", "AWS_SESSION_TOKEN": "test", "HOME": "/root"}
    text = ('{"dirty": false, "ok": true} postgresql://u:db-pass@h/x http://svc:pw-1234@mlflow:5000 aws-secret-9 '
            'hf_abc123 key-value-7 /root pytest')
    assert mask_secrets(text, env) == ('{"dirty": false, "ok": true} postgresql://u:***@h/x http://svc:***@mlflow:5000 '
                                       '*** *** *** /root pytest')  # a 4-letter "secret" never masks ordinary words
