"""`motus model info --json` and `motus model memory`, run through the Typer app as a user would."""

import json

from typer.testing import CliRunner

from motus.cli import app

runner = CliRunner()


def invoke(*args):
    # wide enough that Typer's error box does not wrap the message
    return runner.invoke(app, ["model", *args], env={"COLUMNS": "300"})


def test_info_json_has_geometry_tokens_and_counts():
    r = invoke("info", "--preset", "full", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    g = d["geometry"]
    assert (g["name"], g["frames"], g["latent_frames"]) == ("robotwin", 9, 3)
    assert (g["height"], g["width"]) == (384, 320)
    assert (g["chunk"], g["ratio"], g["downsample"], g["text_len"]) == (16, 2, 3, 512)
    assert g["tokens"]["stage1"] == {"video": 360, "action": 0, "understanding": 0, "text": 512, "joint": 360}
    assert g["tokens"]["stage2"]["action"] == 16 and g["tokens"]["stage3"]["action"] == 21
    assert g["tokens"]["stage3"]["understanding"] == 178
    p = d["parameters"]
    assert (p["video"], p["action"], p["understanding"]) == (4_999_787_712, 641_527_822, 253_493_760)
    assert (p["vlm"], p["vae"]) == (2_127_532_032, 704_688_668)
    assert p["total"] == sum(p[k] for k in ("video", "action", "understanding", "vlm", "vae"))
    assert p["trainable"] == {"stage1": p["video"], "stage2": 5_894_809_294, "stage3": 5_894_809_294}


def test_info_geometry_option_and_human_output():
    r = invoke("info", "--preset", "full", "--geometry", "ac-one", "--json")
    assert r.exit_code == 0, r.output
    g = json.loads(r.stdout)["geometry"]
    assert (g["name"], g["chunk"], g["ratio"], g["downsample"]) == ("ac-one", 48, 6, 1)
    assert g["tokens"]["stage3"]["action"] == 1 + 48 + 4
    r = invoke("info", "--preset", "full", "--no-modes")
    assert r.exit_code == 0
    assert "geometry robotwin: 9 frames (3 latent) at 384x320, chunk 16, ratio 2, downsample 3" in r.stdout
    assert "tokens stage3: video 360, action 21, understanding 178, text 512 (joint 559)" in r.stdout
    assert "  action" in r.stdout and "641.5 M" in r.stdout  # the existing count lines are kept
    r = invoke("info", "--preset", "tiny", "--geometry", "mars")
    assert r.exit_code == 2 and "--geometry" in r.output and "unknown geometry 'mars'" in r.output


def test_memory_prints_the_breakdown_and_fits():
    r = invoke("memory", "--preset", "full", "--stage", "3", "--batch-size", "2", "--zero-stage", "2",
               "--offload")
    assert r.exit_code == 0, r.output
    for part in ("trainable weights (fp32)", "frozen weights", "gradients", "optimizer states", "activations",
                 "without checkpointing", "workspace", "<- peak", "fits", "assumptions:", "ZeRO 2"):
        assert part in r.stdout, part


def test_memory_exits_1_naming_the_settings_when_it_does_not_fit():
    r = invoke("memory", "--preset", "full", "--stage", "3", "--batch-size", "8", "--zero-stage", "3",
               "--device-memory", "80")
    assert r.exit_code == 1
    for part in ("does not fit", "batch size 8", "ZeRO stage 3", "offload off", "80.0 GiB available", "Try"):
        assert part in r.stderr, (part, r.stderr)
    r = invoke("memory", "--preset", "full", "--batch-size", "8", "--zero-stage", "3", "--json")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["fits"] is False and "ZeRO stage 3" in d["message"] and d["total_bytes"] > d["device_bytes"]


def test_memory_json_and_world_size():
    r = invoke("memory", "--stage", "3", "--batch-size", "4", "--zero-stage", "3", "--world-size", "8",
               "--no-activation-checkpointing", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["world_size"], d["zero_stage"], d["activation_checkpointing"], d["fits"]) == (8, 3, False, True)
    assert d["activations_bytes"] == d["activations_full_bytes"] > d["activations_checkpointed_bytes"]
    assert d["trainable_weights_bytes"] == 4 * d["parameters"]["trainable"] // 8


def test_memory_rejects_unknown_values_naming_the_option():
    for args, option, text in [
        (("--stage", "4"), "--stage", "expected one of [1, 2, 3]"),
        (("--preset", "huge"), "--preset", "unknown model preset 'huge'"),
        (("--zero-stage", "7"), "--zero-stage", "expected one of [0, 1, 2, 3]"),
        (("--zero-stage", "0", "--offload"), "--offload", "ZeRO stage >= 1"),
        (("--precision", "fp16"), "--precision", "expected one of ['bf16', 'fp32']"),
        (("--batch-size", "0"), "--batch-size", "must be >= 1"),
    ]:
        r = invoke("memory", *args)
        assert r.exit_code == 2, (args, r.output)
        assert option in r.output and text in r.output, (args, r.output)
