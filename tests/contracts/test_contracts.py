"""The records that cross rooms: JSON round trips, the schema-0 shapes still read, bad records named."""

from __future__ import annotations

import dataclasses
import json

import pytest

from motus.contracts import (
    LATENT_ACTION_JOB,
    LINEAGE_FILE,
    STAGE_JOB,
    ContractError,
    FeatureManifest,
    LineageRecord,
    ModelRef,
    TierManifest,
    TierRef,
)
from motus.track.tags import lineage_tags, tier_hash_keys, tiers_from_tags

A, B, D = "a" * 64, "b" * 64, "d" * 32


def _record(**kw) -> LineageRecord:
    base = dict(job=STAGE_JOB, registered_model="motus-aloha", config_hash="c" * 64,
                tiers=(TierRef("t1", 6, A, D, 1.0),), run_id="r1", stage="stage3", stage_number=3,
                parent="models:/motus-latent-action/2", checkpoint="runs/s3/checkpoints/step_000006",
                features={"latent_actions/t1": B}, normalization={"t1": {"kind": "meanstd"}}, device_hours=0.5,
                wall_seconds=900.0, precision="fp32", device_type="cpu", code_commit="f" * 40, code_dirty=False)
    base.update(kw)
    return LineageRecord(**base)


def test_lineage_record_round_trips_through_json_and_the_file(tmp_path):
    rec = _record()
    assert LineageRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec
    rec.write(tmp_path)
    assert (tmp_path / LINEAGE_FILE).is_file() and LineageRecord.exists(tmp_path)
    back = LineageRecord.read(tmp_path)
    assert back == rec and back.schema_version == LineageRecord.SCHEMA
    assert back.tier("t1") == TierRef("t1", 6, A, D, 1.0) and back.tier("nope") is None
    assert back.label == "stage3" and _record(job=LATENT_ACTION_JOB, stage=None).label == "latent-action"
    with pytest.raises(dataclasses.FrozenInstanceError):  # a record is a fact, not a scratchpad
        rec.config_hash = "x"  # type: ignore[misc]


def test_schema0_stage_and_latent_action_exports_still_read(tmp_path):
    stage0 = {"stage": "stage1", "stage_number": 1, "registered_model": "motus-vgm", "config_hash": "c",
              "parent": None, "checkpoint": "ck", "normalization": {}, "device_hours": 0.1, "wall_seconds": 3.0,
              "precision": "fp32", "device_type": "cpu", "mlflow_run_id": "r0",
              "tiers": {"versioned": {"level": 2, "digest": D, "content_hash": A, "weight": 0.5},
                        "plain": {"level": 3, "digest": B, "content_hash": B, "weight": 0.5}}}
    rec = LineageRecord.from_json(stage0)
    assert rec.job == STAGE_JOB and rec.run_id == "r0" and rec.stage_number == 1
    # the old `digest` was the DVC hash where the tier was versioned, else the content hash again
    assert rec.tier("versioned") == TierRef("versioned", 2, A, D, 0.5)
    assert rec.tier("plain") == TierRef("plain", 3, B, None, 0.5)
    lam0 = {"job": "latent-action", "registered_model": "motus-lam", "config_hash": "c", "checkpoint": None,
            "device_hours": 0.2, "precision": "fp32", "flow_features": {"t1": B}, "tiers": {"t1": A},
            "mlflow_run_id": "r1"}
    lam = LineageRecord.from_json(lam0)
    assert lam.job == LATENT_ACTION_JOB and lam.tiers == (TierRef("t1", None, A),)
    assert lam.features == {"flow/t1": B} and lam.label == "latent-action"


def test_bad_records_are_named(tmp_path):
    with pytest.raises(ContractError, match="lineage.json is missing"):
        LineageRecord.read(tmp_path)
    (tmp_path / LINEAGE_FILE).write_text("{not json")
    with pytest.raises(ContractError, match=f"{LINEAGE_FILE} is not valid JSON"):
        LineageRecord.read(tmp_path)
    with pytest.raises(ContractError, match="missing 'registered_model'"):
        LineageRecord.from_json({"schema_version": 1, "job": "stage", "config_hash": "c", "tiers": {}})
    with pytest.raises(ContractError, match="schema_version 9 is newer"):
        LineageRecord.from_json({**_record().to_json(), "schema_version": 9})
    with pytest.raises(ContractError, match="missing 'content_hash'"):
        LineageRecord.from_json({**_record().to_json(), "tiers": {"t1": {"level": 6}}})


def test_model_ref():
    ref = ModelRef.parse("models:/motus-vgm/3")
    assert ref == ModelRef("motus-vgm", 3) and str(ref) == "motus-vgm/3" and ref.uri == "models:/motus-vgm/3"
    with pytest.raises(ContractError, match="NAME/VERSION"):
        ModelRef.parse("motus-vgm@champion")


def test_tag_codec_says_one_hash_per_tier_and_reads_old_tags():
    rec = _record(tiers=(TierRef("t1", 6, A, D, 1.0), TierRef("t2", 2, B, None, 0.0)))
    tags = lineage_tags(rec, run_tags={"code.commit": "ignored"})
    assert tags["motus.code_commit"] == "f" * 40 and tags["motus.code_dirty"] == "false"
    assert tags["motus.stage"] == "stage3" and tags["motus.stage_number"] == "3"
    assert tiers_from_tags(tags) == [TierRef("t1", 6, A, D), TierRef("t2", 2, B, None)]
    assert not any(k.endswith(".digest") for k in tags)
    # a record from before the code fields: the run's tags say it
    old = lineage_tags(_record(code_commit=None, code_dirty=None), run_tags={"code.commit": "e" * 40,
                                                                            "code.dirty": "true"})
    assert old["motus.code_commit"] == "e" * 40 and old["motus.code_dirty"] == "true"
    # schema-0 version tags: digest only (DVC or content), content_hash beside it
    schema0 = {"motus.tier.t1.level": "6", "motus.tier.t1.digest": D, "motus.tier.t1.content_hash": A,
               "motus.tier.t2.level": "", "motus.tier.t2.digest": B, "motus.tier.t2.content_hash": B}
    assert tiers_from_tags(schema0) == [TierRef("t1", 6, A, D), TierRef("t2", None, B, None)]
    assert tier_hash_keys("t1") == ("motus.tier.t1.content_hash", "motus.tier.t1.dvc_hash", "motus.tier.t1.digest")


def test_tier_and_feature_manifests_round_trip_and_name_what_is_wrong(tmp_path):
    shards = ({"name": "shards/shard-000000.tar", "sha256": A, "bytes": 10, "episodes": 2},)
    tier = TierManifest(tier="t1", level=6, content_hash=A, episodes=2, frames=40, shards=shards,
                        embodiments={"aloha": 2}, fps=50.0, fps_values=(50.0,), views={"top": [64, 64]},
                        action_dim=14, action_stats={"mean": [0.0] * 14}, state_stats=None)
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "manifest.json").write_text(json.dumps(tier.to_json()))
    assert TierManifest.exists(tmp_path / "t1") and TierManifest.read(tmp_path / "t1") == tier
    assert tier.to_json()["state_stats"] is None  # a tier without state says so, it does not invent {}
    feat = FeatureManifest(feature="flow", tier="t1", tier_hash=A, content_hash=B, shards=shards, episodes=2,
                           arrays={"flow": {"dtype": "|u1", "shape": [16, 16, 3]}}, meta={"stride": 3})
    assert FeatureManifest.from_json(json.loads(json.dumps(feat.to_json()))) == feat
    with pytest.raises(ContractError, match=r"t2/manifest.json: not found; is .* a built tier"):
        TierManifest.read(tmp_path / "t2")
    broken = {k: v for k, v in tier.to_json().items() if k != "content_hash"}
    with pytest.raises(ContractError, match="manifest.json: missing 'content_hash'"):
        TierManifest.from_json(broken)
    with pytest.raises(ContractError, match="schema_version 7 is not 1"):
        FeatureManifest.from_json({**feat.to_json(), "schema_version": 7})
    with pytest.raises(ContractError, match=r"missing keys \['tier_hash'\]"):
        FeatureManifest.from_json({k: v for k, v in feat.to_json().items() if k != "tier_hash"})


def test_the_normalisation_contract_names_each_field_that_differs():
    from motus.contracts import ContractError, check_normalization, normalization_mismatches

    trained = {"method": "mean_std", "tier": "t", "embodiment": "aloha", "action_dim": 14, "padded_action_dim": 14,
               "actions": {"mean": [0.1, 0.2], "std": [1.0, 2.0]}, "state": {"mean": [0.0], "std": [1.0]},
               "content_hash": "a" * 64}
    rebuilt = {**trained, "content_hash": "b" * 64, "actions": {"mean": [0.1 + 1e-9, 0.2], "std": [1.0, 2.0]}}
    assert normalization_mismatches(trained, rebuilt) == []  # same statistics: the same contract
    other = {**trained, "method": "min_max", "embodiment": "ur5", "actions": {"mean": [0.1, 0.5], "std": [1.0, 2.0]}}
    found = normalization_mismatches(trained, other)
    assert found == ['method: model "mean_std", data "min_max"', 'embodiment: model "aloha", data "ur5"',
                     "actions.mean: model [0.1, 0.2], data [0.1, 0.5]"]
    older = {k: v for k, v in trained.items() if k != "embodiment"}  # an export from before the field existed
    assert normalization_mismatches(older, {**trained, "embodiment": "ur5"}) == []
    raw = {**trained, "method": "none", "actions": None, "state": None}
    with pytest.raises(ContractError, match=r"export/x: the data's normalisation differs .* tier 't'.*method: model "
                                            r"\"mean_std\", data \"none\"; actions: model \{.*\}, data null"):
        check_normalization(trained, raw, "export/x")


def test_joint_names_are_part_of_the_contract_where_both_sides_name_them(tmp_path):
    from motus.config import ConfigError, load_params
    from motus.contracts import normalization_mismatches

    named = {"method": "mean_std", "action_dim": 3, "action_names": ["waist", "shoulder", "elbow"]}
    swapped = {**named, "action_names": ["shoulder", "waist", "elbow"]}
    assert normalization_mismatches(named, swapped) == [
        'action_names: model ["waist", "shoulder", "elbow"], data ["shoulder", "waist", "elbow"]']
    assert normalization_mismatches(named, {**named, "action_names": None}) == []  # an unnamed tier: no claim
    # declared per tier in params.yaml: one distinct name per action dim
    from tests.support.project import shipped_params

    raw = shipped_params()
    raw["tiers"]["sim-metaworld"]["action_names"] = ["dx", "dy", "dx"]
    path = tmp_path / "params.yaml"
    path.write_text(__import__("yaml").safe_dump(raw))
    with pytest.raises(ConfigError, match=r"tiers.sim-metaworld.*(3 names for action_dim 4|repeats a name)"):
        load_params(path)
