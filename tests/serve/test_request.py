"""The serving contract and the request checks: every way a request can miss the signature is a BadRequest
naming the field and the expected value (the server answers it 4xx and keeps serving)."""

from __future__ import annotations

import numpy as np
import pytest

from motus.contracts import ActionSpace, ContractError, ServingContract
from motus.data.episode import compose_three_view
from motus.evaluate.remote import encode_image
from motus.serve.request import BadRequest, parse_request


def contract(*, composed: bool = False, two: bool = False) -> ServingContract:
    spaces = [ActionSpace("target-aloha-transfer", "aloha", "top", (48, 64), 14, 14,
                          source_views=("cam_high", "cam_left_wrist", "cam_right_wrist") if composed else (),
                          instruction="pick up the cube")]
    if two:
        spaces.append(ActionSpace("target-aloha-insertion", "aloha", "top", (32, 32), 14, 14))
    return ServingContract("motus-aloha", 3, ("vla", "joint", "wm"), chunk=8, hold=1, spaces=tuple(spaces))


def body(**over):
    b = {"image": encode_image(np.zeros((48, 64, 3), np.uint8)), "state": [0.0] * 14,
         "instruction": "pick up the cube"}
    b.update(over)
    return {k: v for k, v in b.items() if v is not None}


def test_the_contract_round_trips_and_rejects_what_it_cannot_serve(tmp_path):
    c = contract(composed=True, two=True)
    c.write(tmp_path)
    assert ServingContract.read(tmp_path) == c
    assert c.space("target-aloha-insertion").image_size == (32, 32)
    with pytest.raises(ContractError, match="name one"):
        c.space(None)
    bad = c.to_json() | {"modes": ["vla", "teleport"]}
    with pytest.raises(ContractError, match="unknown mode.*teleport"):
        ServingContract.from_json(bad)
    with pytest.raises(ContractError, match="spaces\\[0\\].*image_size"):
        ServingContract.from_json(c.to_json() | {"spaces": [c.spaces[0].to_json() | {"image_size": [48]}]})


def test_a_good_request_in_both_image_forms_is_parsed_into_the_plan_inputs():
    img = np.arange(48 * 64 * 3, dtype=np.uint32).reshape(48, 64, 3) % 256
    for form in (encode_image(img.astype(np.uint8)), img.tolist()):
        r = parse_request(body(image=form, seed=7, steps=3), contract())
        assert r.frame.dtype == np.uint8 and (r.frame == img).all()
        assert r.state.shape == (14,) and r.mode == "vla" and r.seed == 7 and r.steps == 3
        assert r.space.tier == "target-aloha-transfer" and r.actions is None
    wm = parse_request(body(mode="wm", actions=np.ones((8, 14)).tolist()), contract())
    assert wm.actions.shape == (8, 14) and wm.mode == "wm"


@pytest.mark.parametrize(("change", "field", "expected"), [
    (dict(image=encode_image(np.zeros((64, 64, 3), np.uint8))), "image", "[48, 64, 3]"),
    (dict(image=(np.zeros((48, 64, 3)) + 0.5).tolist()), "image", "uint8"),
    (dict(image=(np.zeros((48, 64, 3), np.int64) + 300).tolist()), "image", "uint8"),
    (dict(image={"shape": [48, 64, 3], "dtype": "uint8", "b64": "AAAA"}), "image.b64", "9216 bytes"),
    (dict(image={"shape": [48, 64, 3], "dtype": "float32", "b64": ""}), "image.dtype", "uint8"),
    (dict(image=None), "image", "'top' camera"),
    (dict(image=None, images={"top": encode_image(np.zeros((48, 64, 3), np.uint8)),
                  "wrist": encode_image(np.zeros((48, 64, 3), np.uint8))}), "images", "one camera, 'top'"),
    (dict(state=[0.0] * 13), "state", "14 numbers"),
    (dict(state=[0.0] * 13 + [float("nan")]), "state", "finite"),
    (dict(state="0,0"), "state", "14 numbers"),
    (dict(instruction=3), "instruction", "a string"),
    (dict(instruction=None), "instruction", "a string"),
    (dict(mode="teleport"), "mode", "one of ['vla', 'joint', 'wm']"),
    (dict(mode="wm"), "actions", "[8, 14]"),
    (dict(mode="wm", actions=[[0.0] * 14] * 7), "actions", "shape [8, 14]"),
    (dict(actions=[[0.0] * 14] * 8), "actions", "only wm"),
    (dict(seed=-1), "seed", "an integer"),
    (dict(steps=0), "steps", "an integer in [1, 1000]"),
    (dict(return_frames=True), "return_frames", "vla"),
    (dict(tier="target-aloha-sorting"), "tier", "one of ['target-aloha-transfer']"),
    (dict(temperature=0.5), "temperature", "one of the fields"),
])
def test_each_mismatch_names_its_field_and_what_was_expected(change, field, expected):
    with pytest.raises(BadRequest) as e:
        parse_request(body(**change), contract())
    assert e.value.field == field, e.value
    assert expected in str(e.value.expected)
    assert e.value.to_json()["field"] == field


def test_a_model_of_two_action_spaces_needs_the_tier_and_checks_its_size():
    c = contract(two=True)
    with pytest.raises(BadRequest) as e:
        parse_request(body(), c)
    assert e.value.field == "tier" and "2 action spaces" in e.value.expected
    r = parse_request(body(tier="target-aloha-insertion", image=encode_image(np.zeros((32, 32, 3), np.uint8))), c)
    assert r.space.image_size == (32, 32)
    with pytest.raises(BadRequest, match="image: expected a \\[32, 32, 3\\]"):
        parse_request(body(tier="target-aloha-insertion"), c)


def test_a_three_view_model_takes_its_cameras_and_composes_them_as_ingest_did():
    rng = np.random.default_rng(0)
    cams = {v: rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)
            for v in ("cam_high", "cam_left_wrist", "cam_right_wrist")}
    r = parse_request(body(image=None, images={k: encode_image(v) for k, v in cams.items()}), contract(composed=True))
    want = compose_three_view(*(cams[v][None] for v in ("cam_high", "cam_left_wrist", "cam_right_wrist")))[0]
    assert r.frame.shape == (48, 64, 3) and (r.frame == want).all()
    with pytest.raises(BadRequest) as e:
        parse_request(body(image=None, images={k: encode_image(v) for k, v in cams.items() if k != "cam_left_wrist"}),
                      contract(composed=True))
    assert e.value.field == "images.cam_left_wrist"
    with pytest.raises(BadRequest) as e:  # the composed view itself is not what this model's clients send
        parse_request(body(), contract(composed=True))
    assert e.value.field == "images"


def test_what_to_serve_is_parsed_and_a_bad_target_is_refused_by_the_cli(tmp_path):
    from typer.testing import CliRunner

    from motus.cli import app
    from motus.serve.deployment import Target

    assert Target.parse("motus-aloha@champion") == Target("motus-aloha", alias="champion")
    assert Target.parse("models:/motus-aloha/3") == Target("motus-aloha", version=3)
    assert Target.parse(str(tmp_path)).path == tmp_path
    r = CliRunner().invoke(app, ["serve", "motus aloha@@champion"])
    assert r.exit_code == 2 and "neither MODEL@ALIAS" in r.output
    r = CliRunner().invoke(app, ["evaluate", "--help"])
    assert "--via-server" in r.output
