"""Simulator sources for the embedded data pyramid: Meta-World (Sawyer) and gym-aloha (bimanual ViperX).

Public API (all generators yield ``motus.data.episode.Episode`` with ``problems() == []``, deterministic in seed):

* ``metaworld_episodes(tasks, episodes_per_task, seed, image_size=(64, 64), camera="corner", max_steps=100,
  embodiment="sawyer", id_prefix="mw")`` -- scripted Meta-World v3 experts, 4-d actions, 4-d state.
* ``aloha_episodes(task, n, seed, image_size=(64, 64), cameras=("top",), max_steps=400, id_prefix="aloha")``
  -- scripted bimanual demos (transfer_cube / insertion), 14-d joint-position actions, 14-d qpos state, 50 fps.
* ``aloha_random_reachable_episodes(n, seed, image_size=(64, 64), cameras=("top",), steps_per_target=25,
  targets_per_episode=4, id_prefix="aloha_rand")`` -- task-agnostic random reachable motion (pyramid level 4).
* ``ScriptedAlohaPolicy(task, seed=None, object_poses=None, shadow=True)`` -- the scripted ALOHA expert as a
  step-by-step policy for closed-loop evaluation (see its docstring).

The simulators themselves live in `motus.sim` (public, used by evaluation too); these functions record their
rollouts as `Episode`s. Rendering is offscreen (``MUJOCO_GL=egl`` unless set; ``osmesa`` fallback) at the requested size with shadows,
reflections, skybox and multisampling off. Import this module before anything imports mujoco/dm_control if
you rely on the automatic backend choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from motus.data.episode import Episode
from motus.sim import aloha as _aloha
from motus.sim import metaworld as _metaworld
from motus.sim.aloha import INSTRUCTIONS as ALOHA_INSTRUCTIONS
from motus.sim.aloha import ScriptedAlohaPolicy, initial_object_poses, joint_limits, scripted_success
from motus.sim.metaworld import DEFAULT_TASKS as METAWORLD_DEFAULT_TASKS
from motus.sim.metaworld import all_tasks as metaworld_tasks
from motus.sim.metaworld import task_instruction
from motus.sim.render import GL_BACKEND, FastRenderer


def _episodes(records: Iterator[dict[str, Any]]) -> Iterator[Episode]:
    for r in records:
        yield Episode(**r)


def metaworld_episodes(*args: Any, **kwargs: Any) -> Iterator[Episode]:
    return _episodes(_metaworld.metaworld_episodes(*args, **kwargs))


def aloha_episodes(*args: Any, **kwargs: Any) -> Iterator[Episode]:
    return _episodes(_aloha.aloha_episodes(*args, **kwargs))


def aloha_random_reachable_episodes(*args: Any, **kwargs: Any) -> Iterator[Episode]:
    return _episodes(_aloha.aloha_random_reachable_episodes(*args, **kwargs))


__all__ = [
    "ALOHA_INSTRUCTIONS",
    "GL_BACKEND",
    "METAWORLD_DEFAULT_TASKS",
    "FastRenderer",
    "ScriptedAlohaPolicy",
    "aloha_episodes",
    "aloha_random_reachable_episodes",
    "initial_object_poses",
    "joint_limits",
    "metaworld_episodes",
    "metaworld_tasks",
    "scripted_success",
    "task_instruction",
]
