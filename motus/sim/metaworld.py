"""Meta-World (v3, Sawyer) episodes from the package's scripted expert policies.

* Environments: ``metaworld.env_dict.ALL_V3_ENVIRONMENTS[task]`` with the goal observable (the experts read the
  goal from the observation). Episode k of a task resets with ``env.seed(seed_k)`` and a seeded random object /
  goal placement, so a (task, seed) pair always gives the same episode.
* Actions [T, 4] float32 in [-1, 1]: end-effector xyz delta (x 1 cm per unit) and gripper effort, exactly what was
  applied after observing frame t (``metaworld.policies`` expert, clipped).
* State [T, 4] float32: the first 4 observation dims, hand (end-effector) xyz in metres and the normalised
  gripper-finger distance (0 closed .. 1 open) -- the robot's proprioception, no privileged object state.
* Frames: rendered offscreen at the requested size. Meta-World's ``corner`` camera is mounted upside down
  (its image-up axis points at the floor), so such cameras are turned upright by a 180-degree rotation
  (a pure vertical flip would mirror the scene); detected from the camera pose, not hard-coded.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from motus.sim.render import FastRenderer, camera_is_upside_down

DEFAULT_TASKS: tuple[str, ...] = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3",
                                  "drawer-open-v3", "button-press-v3")

# Nicer phrasings for common tasks; anything else falls back to the task name without "-v3" and hyphens.
INSTRUCTIONS: dict[str, str] = {
    "assembly": "put the ring onto the peg",
    "basketball": "dunk the ball into the basket",
    "bin-picking": "move the cube from one bin to the other",
    "box-close": "put the lid on the box",
    "button-press": "press the button",
    "button-press-topdown": "press the button from the top",
    "button-press-topdown-wall": "press the button from the top behind the wall",
    "button-press-wall": "press the button behind the wall",
    "coffee-button": "press the coffee machine button",
    "coffee-pull": "pull the mug away from the coffee machine",
    "coffee-push": "push the mug under the coffee machine",
    "dial-turn": "turn the dial",
    "disassemble": "take the ring off the peg",
    "door-close": "close the door",
    "door-lock": "lock the door",
    "door-open": "open the door",
    "door-unlock": "unlock the door",
    "drawer-close": "close the drawer",
    "drawer-open": "open the drawer",
    "faucet-close": "turn the faucet off",
    "faucet-open": "turn the faucet on",
    "hammer": "hammer the nail into the wall",
    "hand-insert": "insert the gripper into the hole",
    "handle-press": "press the handle down",
    "handle-press-side": "press the handle down from the side",
    "handle-pull": "pull the handle up",
    "handle-pull-side": "pull the handle up from the side",
    "lever-pull": "pull the lever",
    "peg-insert-side": "insert the peg into the hole from the side",
    "peg-unplug-side": "unplug the peg from the side",
    "pick-out-of-hole": "pick the peg out of the hole",
    "pick-place": "pick up the puck and place it at the goal",
    "pick-place-wall": "pick up the puck and place it at the goal behind the wall",
    "plate-slide": "slide the plate into the goal",
    "plate-slide-back": "slide the plate back into the goal",
    "plate-slide-back-side": "slide the plate back into the goal from the side",
    "plate-slide-side": "slide the plate into the goal from the side",
    "push": "push the puck to the goal",
    "push-back": "push the puck back to the goal",
    "push-wall": "push the puck to the goal behind the wall",
    "reach": "reach the goal position",
    "reach-wall": "reach the goal position behind the wall",
    "shelf-place": "place the puck on the shelf",
    "soccer": "kick the ball into the goal",
    "stick-pull": "pull the container with the stick",
    "stick-push": "push the container with the stick",
    "sweep": "sweep the puck off the table",
    "sweep-into": "sweep the puck into the hole",
    "window-close": "close the window",
    "window-open": "open the window",
}

ACTION_DIM = 4
STATE_DIM = 4


def _canonical(task: str) -> str:
    """'pick-place', 'pick_place', 'pick-place-v3' -> 'pick-place-v3'."""
    name = task.strip().lower().replace("_", "-")
    return name if re.search(r"-v\d+$", name) else f"{name}-v3"


def task_instruction(task: str) -> str:
    """A readable sentence for a Meta-World task name ('pick-place-v3' -> 'pick up the puck and place it ...')."""
    base = re.sub(r"-v\d+$", "", _canonical(task))
    return INSTRUCTIONS.get(base, base.replace("-", " "))


def all_tasks() -> list[str]:
    """The 50 Meta-World v3 task names that have a scripted expert."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.policies import ENV_POLICY_MAP

    return [name for name in ALL_V3_ENVIRONMENTS if name in ENV_POLICY_MAP]


def _episode_seed(seed: int, task: str, k: int) -> int:
    """A per-(task, episode) seed, stable across task-list orderings."""
    digest = sum((i + 1) * ord(c) for i, c in enumerate(task))
    return int(np.random.SeedSequence([seed, digest, k]).generate_state(1)[0])


def _expert_action(policy: Any, obs: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():  # the experts warn on every large (later clipped) command
        warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
        return np.clip(policy.get_action(obs), -1.0, 1.0)


def make_env(task: str) -> Any:
    """A goal-observable Meta-World env for ``task`` whose resets are driven by ``env.seed(...)``."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    name = _canonical(task)
    if name not in ALL_V3_ENVIRONMENTS:
        raise ValueError(f"unknown Meta-World task {task!r}; known: {sorted(ALL_V3_ENVIRONMENTS)}")
    env = ALL_V3_ENVIRONMENTS[name]()
    env._partially_observable = False  # goal in the observation: the scripted experts need it
    try:
        del env.sawyer_observation_space  # cached property; recomputed for the new observability
    except AttributeError:
        pass
    env._set_task_called = True
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True  # object/goal placement from env.np_random (seeded per episode)
    return env


def metaworld_episodes(tasks: list[str] | None, episodes_per_task: int, seed: int,
                       image_size: tuple[int, int] = (64, 64), camera: str = "corner", max_steps: int = 100,
                       embodiment: str = "sawyer", id_prefix: str = "mw") -> Iterator[dict[str, Any]]:
    """Scripted-expert Meta-World episodes: for each task (default ``DEFAULT_TASKS``), ``episodes_per_task``
    episodes of ``max_steps`` frames. Frames {camera: [T,H,W,3]}, actions [T,4], state [T,4] (hand xyz + gripper
    opening), fps 80 (Meta-World's control rate), ``extra`` = {task, seed, success, success_step, sim}."""
    from metaworld.policies import ENV_POLICY_MAP

    names = [_canonical(t) for t in (tasks if tasks else DEFAULT_TASKS)]
    for name in names:
        if name not in ENV_POLICY_MAP:
            raise ValueError(f"no scripted Meta-World expert for {name!r}")
    h, w = image_size
    for name in names:
        env = make_env(name)
        policy = ENV_POLICY_MAP[name]()
        steps = int(min(max_steps, env.max_path_length))
        fps = 1.0 / (float(env.model.opt.timestep) * int(env.frame_skip))
        renderer = FastRenderer(env.model, h, w)
        try:
            for k in range(episodes_per_task):
                ep_seed = _episode_seed(seed, name, k)
                env.seed(ep_seed)
                obs, _ = env.reset()
                renderer.rotate180[camera] = camera_is_upside_down(env.model, env.data, camera)
                frames = np.empty((steps, h, w, 3), dtype=np.uint8)
                actions = np.empty((steps, ACTION_DIM), dtype=np.float32)
                state = np.empty((steps, STATE_DIM), dtype=np.float32)
                success, success_step = False, None
                for t in range(steps):
                    frames[t] = renderer.render(env.data, camera)
                    state[t] = obs[:STATE_DIM]
                    actions[t] = _expert_action(policy, obs)
                    obs, _, _, _, info = env.step(actions[t])
                    success = bool(info.get("success", False))
                    if success and success_step is None:
                        success_step = t
                task = re.sub(r"-v\d+$", "", name)
                yield dict(
                    episode_id=f"{id_prefix}_{task.replace('-', '_')}_s{seed}_{k}",
                    frames={camera: frames},
                    actions=actions,
                    state=state,
                    instructions=[task_instruction(name)],
                    fps=fps,
                    embodiment=embodiment,
                    source=f"sim/metaworld/{name}",
                    extra={"task": name, "seed": int(ep_seed), "success": success,
                           "success_step": success_step, "sim": "metaworld"},
                )
        finally:
            renderer.close()
            env.close()


__all__ = ["DEFAULT_TASKS", "INSTRUCTIONS", "all_tasks", "make_env", "metaworld_episodes", "task_instruction"]
