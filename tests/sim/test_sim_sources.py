"""Simulator sources (Meta-World, gym-aloha): valid episodes, documented shapes, determinism, expert quality."""

from __future__ import annotations

import numpy as np
import pytest

sim = pytest.importorskip("motus.data.sources.simulators")
pytest.importorskip("metaworld")
pytest.importorskip("gym_aloha")


def _same(a, b) -> bool:
    return (np.array_equal(a.actions, b.actions) and np.array_equal(a.state, b.state)
            and all(np.array_equal(a.frames[v], b.frames[v]) for v in a.frames))


# ------------------------------------------------------------------------------------------------- Meta-World
@pytest.fixture(scope="module")
def mw_eps():
    return list(sim.metaworld_episodes(["reach-v3", "push"], 2, seed=3, image_size=(32, 48), max_steps=12))


def test_metaworld_episodes_valid(mw_eps):
    assert [e.extra["task"] for e in mw_eps] == ["reach-v3", "reach-v3", "push-v3", "push-v3"]
    ids = {e.episode_id for e in mw_eps}
    assert len(ids) == 4
    for e in mw_eps:
        assert e.problems(action_dim=4, action_bounds=(-1.0, 1.0), require_instruction=True) == []
        assert e.frames["corner"].shape == (12, 32, 48, 3) and e.frames["corner"].dtype == np.uint8
        assert e.actions.shape == (12, 4) and e.actions.dtype == np.float32
        assert e.state.shape == (12, 4) and e.state.dtype == np.float32
        assert e.embodiment == "sawyer" and e.extra["sim"] == "metaworld"
        assert isinstance(e.extra["success"], bool) and e.fps == pytest.approx(80.0)
        assert e.instructions and e.instructions[0]
        assert e.frames["corner"].std() > 5  # something was rendered
    assert mw_eps[2].instructions == ["push the puck to the goal"]
    assert sim.task_instruction("pick-place-v3") == "pick up the puck and place it at the goal"
    assert sim.task_instruction("some-new-task-v3") == "some new task"
    assert len(sim.metaworld_tasks()) == 50


def test_metaworld_deterministic(mw_eps):
    again = list(sim.metaworld_episodes(["reach-v3", "push"], 2, seed=3, image_size=(32, 48), max_steps=12))
    assert all(_same(a, b) for a, b in zip(mw_eps, again, strict=True))
    assert not _same(mw_eps[0], mw_eps[1])  # episodes of a task differ
    other = next(iter(sim.metaworld_episodes(["reach-v3"], 1, seed=4, image_size=(32, 48), max_steps=12)))
    assert not _same(mw_eps[0], other)


def test_metaworld_frames_upright():
    # the corner camera is mounted upside down; upright, the dark void is at the top and the table at the bottom
    ep = next(iter(sim.metaworld_episodes(["reach-v3"], 1, seed=0, image_size=(64, 64), max_steps=2)))
    img = ep.frames["corner"][0].astype(np.float64)
    assert img[:8].mean() + 20 < img[-8:].mean()


def test_metaworld_expert_succeeds():
    eps = list(sim.metaworld_episodes(["reach-v3"], 2, seed=0, image_size=(16, 16), max_steps=100))
    assert all(e.extra["success"] for e in eps)


# ------------------------------------------------------------------------------------------------ gym-aloha
@pytest.fixture(scope="module")
def aloha_eps():
    return list(sim.aloha_episodes("transfer_cube", 2, seed=5, image_size=(24, 32), cameras=("top", "angle"),
                                   max_steps=15))


def test_aloha_episodes_valid(aloha_eps):
    for e in aloha_eps:
        assert e.problems(action_dim=14, require_instruction=True) == []
        assert set(e.frames) == {"top", "angle"}
        assert e.frames["top"].shape == (15, 24, 32, 3) and e.frames["top"].dtype == np.uint8
        assert e.actions.shape == (15, 14) and e.actions.dtype == np.float32
        assert e.state.shape == (15, 14) and e.state.dtype == np.float32
        assert e.fps == 50 and e.embodiment == "aloha"
        assert e.instructions == ["transfer the cube from the right arm to the left arm"]
        assert e.extra["sim"] == "gym-aloha" and e.extra["task"] == "transfer_cube"
        assert isinstance(e.extra["success"], bool)
    assert [e.extra["seed"] for e in aloha_eps] == [5, 6]
    # state[0] is gym-aloha's start pose; grippers normalised
    assert np.allclose(aloha_eps[0].state[0, :6], [0, -0.96, 1.16, 0, -0.3, 0], atol=1e-3)


def test_aloha_deterministic(aloha_eps):
    again = list(sim.aloha_episodes("transfer_cube", 2, seed=5, image_size=(24, 32), cameras=("top", "angle"),
                                    max_steps=15))
    assert all(_same(a, b) for a, b in zip(aloha_eps, again, strict=True))
    assert not np.array_equal(aloha_eps[0].actions, aloha_eps[1].actions)


def test_aloha_insertion_episode_valid():
    e = next(iter(sim.aloha_episodes("insertion", 1, seed=0, image_size=(16, 16), max_steps=10)))
    assert e.problems(action_dim=14) == []
    assert e.instructions == ["insert the peg into the socket"]
    with pytest.raises(ValueError):
        next(iter(sim.aloha_episodes("stack_blocks", 1, seed=0)))  # type: ignore[arg-type]


def test_scripted_policy_step_api():
    policy = sim.ScriptedAlohaPolicy("transfer_cube", seed=2)
    planned = policy.plan(30)
    stepped = np.stack([policy(None) for _ in range(30)])
    assert planned.shape == (30, 14) and np.array_equal(planned, stepped)
    pose = sim.initial_object_poses("transfer_cube", 2)
    other = sim.ScriptedAlohaPolicy("transfer_cube", object_poses=pose)
    assert np.array_equal(other.plan(30), planned)


@pytest.mark.slow
def test_scripted_transfer_cube_success_rate():
    ok = sim.scripted_success("transfer_cube", list(range(10)))
    assert sum(ok.values()) / len(ok) >= 0.9, ok


@pytest.mark.slow
def test_scripted_insertion_success_rate():
    ok = sim.scripted_success("insertion", list(range(5)))
    assert sum(ok.values()) / len(ok) >= 0.6, ok


def test_scripted_policy_closed_loop_matches_internal_copy():
    # stepping the policy with the real env state (physics=...) == its internal copy of gym-aloha's scene
    from motus.sim.aloha import JointSim

    env = JointSim("insertion")
    env.reset(sim.initial_object_poses("insertion", 1))
    closed = sim.ScriptedAlohaPolicy("insertion", seed=1)
    actions = []
    for _ in range(210):  # past the first re-planning step
        actions.append(closed.step(physics=env.physics))
        env.step(actions[-1])
    assert closed.replan_steps and closed.replan_steps[0] < 210
    shadow = sim.ScriptedAlohaPolicy("insertion", seed=1).plan(210)
    np.testing.assert_allclose(np.stack(actions), shadow, atol=1e-5)


def test_render_decimation_leaves_physics_unchanged():
    from motus.sim.aloha import JointSim, _rollout
    from motus.sim.render import decimate_meshes_for_rendering

    runs = []
    for decimate in (False, True):
        env = JointSim("transfer_cube")
        if decimate:
            before, after = decimate_meshes_for_rendering(env.model, 0.004)
            assert after < before / 2
        policy = sim.ScriptedAlohaPolicy("transfer_cube", seed=0)
        runs.append(_rollout(env, None, [], 150, lambda t, p=policy, e=env: p.step(physics=e.physics),
                             policy.object_poses)[1])
    assert np.array_equal(runs[0], runs[1])


def test_random_reachable_within_limits():
    eps = list(sim.aloha_random_reachable_episodes(2, seed=1, image_size=(16, 16), steps_per_target=5,
                                                   targets_per_episode=3))
    assert len(eps) == 2 and eps[0].episode_id != eps[1].episode_id
    from motus.sim.aloha import ARM_JOINT_ADDR, JointSim

    model = JointSim("transfer_cube").model
    lo, hi = [], []
    for adr in ARM_JOINT_ADDR:
        j = int(np.where(model.jnt_qposadr == adr)[0][0])
        lo.append(model.jnt_range[j][0])
        hi.append(model.jnt_range[j][1])
    for e in eps:
        assert e.problems(action_dim=14) == []
        assert e.actions.shape == (15, 14) and e.state.shape == (15, 14)
        assert e.instructions == [] and e.extra["kind"] == "random-reachable" and e.extra["sim"] == "gym-aloha"
        arms = np.concatenate([e.actions[:, 0:6], e.actions[:, 7:13]], axis=1)
        assert (arms >= np.array(lo)).all() and (arms <= np.array(hi)).all()
        grippers = e.actions[:, [6, 13]]
        assert (grippers >= 0).all() and (grippers <= 1).all()
        assert np.abs(np.diff(e.actions, axis=0)).max() < 0.5  # smooth: no jumps between steps
    m_lo, m_hi = sim.joint_limits(model)
    assert (m_lo > np.array(lo)).all() and (m_hi < np.array(hi)).all()  # a real safety margin
    again = next(iter(sim.aloha_random_reachable_episodes(1, seed=1, image_size=(16, 16), steps_per_target=5,
                                                          targets_per_episode=3)))
    assert _same(eps[0], again) and not np.array_equal(eps[0].actions, eps[1].actions)
