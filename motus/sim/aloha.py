"""gym-aloha (bimanual ViperX) episodes: scripted transfer-cube / insertion demos and random reachable motion.

Action space (the paper's target action space, identical to ``gym_aloha``'s ``AlohaEnv``): 14-d absolute joint
positions ``[left 6 joints, left gripper, right 6 joints, right gripper]``, grippers normalised
(0 = closed, 1 = open). State is the 14-d ``qpos`` in the same layout (``AlohaEnv``'s ``agent_pos``).

How the scripted demos are made (the ACT recipe, re-implemented here):

1. In the end-effector (mocap) variant of the scene, the two grippers are welded to mocap bodies. We script
   tool-point waypoints from the *initial object poses* (``gym_aloha.utils.sample_*_pose(seed)``, exactly what
   ``AlohaEnv.reset(seed=seed)`` uses) and record the joint trajectory the arms follow. gym-aloha's welds are
   far too soft on MuJoCo 3 (``solimp=.25 .25``: the gripper lags the mocap by centimetres and sags), so we
   make them stiff (``solimp=0.95 0.99 0.001``), glide the mocaps over the physics substeps (a jump every
   20 ms shakes grasped objects loose) and add weak springs on forearm roll / wrist rotate (otherwise the
   weld "IK" spins both by +-pi near the wrist singularity). Note the welds have no ``relpose``, so MuJoCo
   takes it from ``qpos0``: the mocap body sits 13.5 cm ahead of ``gripper_link`` (near the fingertips); we
   read that offset from ``eq_data`` and command a tool point between the finger pads instead.
2. The joints reached after each step (plus the commanded gripper openings) are the 14-d joint-position
   actions, executed in the joint-space scene (the same XML, task and ``dm_control`` stepping as ``AlohaEnv``);
   frames, qpos and rewards come from that scene, so every stored (frame, action) pair is physically real.
3. At a few re-planning steps (cube hand-over; peg alignment) the planner copies the joint-space scene's state
   into its end-effector sim and re-targets from where the objects really are (a closed loop at the
   waypoint level). Without it insertion fails: the two scenes' grasps differ by millimetres.

``ScriptedAlohaPolicy`` is the same expert as a step-by-step policy for closed-loop evaluation::

    from gym_aloha.env import AlohaEnv                              # or gym.make("gym_aloha/AlohaTransferCube-v0")
    env = AlohaEnv("transfer_cube")
    obs, _ = env.reset(seed=s)
    policy = ScriptedAlohaPolicy("transfer_cube", seed=s)          # same seed -> same object poses
    for t in range(400):
        obs, reward, terminated, truncated, info = env.step(policy(obs))   # success: reward == 4
        # policy.step(obs, physics=env) re-plans from the env's true state instead of its internal copy

Measured (MuJoCo 3.3.0, reward reaching 4 at some step, seeds 0-99): transfer_cube 100 %, first success by
step 230; insertion 100 %, by step 250 (both inside gym-aloha's registered 300-step limit). Pure open loop
(``shadow=False``, no physics): transfer_cube 50/50, insertion 1/20.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import mujoco
import numpy as np

from motus.sim.render import FastRenderer  # chooses the GL backend (EGL, else OSMesa)

AlohaTask = Literal["transfer_cube", "insertion"]
TASKS: tuple[str, ...] = ("transfer_cube", "insertion")
INSTRUCTIONS = {
    "transfer_cube": "transfer the cube from the right arm to the left arm",
    "insertion": "insert the peg into the socket",
}
FPS = 50
DT = 1.0 / FPS
ACTION_DIM = 14
STATE_DIM = 14

# Same constants as gym_aloha.constants (duplicated to keep the import of gym_aloha lazy).
START_ARM_POSE = np.array([0, -0.96, 1.16, 0, -0.3, 0, 0.02239, -0.02239] * 2, dtype=np.float64)
GRIPPER_POS_OPEN = 0.05800  # finger slide position for normalised 1
GRIPPER_POS_CLOSE = 0.01844  # ... for normalised 0

# Tool point: along the gripper_link x axis, between the finger pads (pads span 0.064..0.154 m).
TOOL_DEPTH = 0.13
STIFF_WELD_SOLIMP = (0.95, 0.99, 0.001, 0.5, 2.0)
STIFF_WELD_SOLREF = (0.01, 1.0)
ROLL_SPRING = 2.0  # N m / rad


def _assets_dir():
    from gym_aloha.constants import ASSETS_DIR

    return ASSETS_DIR


def initial_object_poses(task: str, seed: int) -> np.ndarray:
    """The object pose(s) ``AlohaEnv.reset(seed=seed)`` places: transfer_cube [7], insertion [14] (peg, socket)."""
    from gym_aloha.utils import sample_box_pose, sample_insertion_pose

    if task == "transfer_cube":
        return np.asarray(sample_box_pose(seed), dtype=np.float64)
    if task == "insertion":
        return np.concatenate(sample_insertion_pose(seed)).astype(np.float64)
    raise ValueError(f"unknown aloha task {task!r}; expected one of {TASKS}")


# ----------------------------------------------------------------------------------------------- quaternions
def _qmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
                     w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
                     w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def _qconj(q: np.ndarray) -> np.ndarray:
    return np.array([q[0], -q[1], -q[2], -q[3]])


def _qaxis(axis: Sequence[float], angle: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    return np.concatenate([[math.cos(angle / 2)], math.sin(angle / 2) * axis])


def _qrot(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    mat = np.zeros(9)
    mujoco.mju_quat2Mat(mat, q)
    return mat.reshape(3, 3) @ v


def _qslerp(a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    dot = float(np.dot(a, b))
    if dot < 0:
        b, dot = -b, -dot
    if dot > 0.9995:
        q = a + s * (b - a)
        return q / np.linalg.norm(q)
    theta = math.acos(min(1.0, dot))
    return (math.sin((1 - s) * theta) * a + math.sin(s * theta) * b) / math.sin(theta)


def gripper_quat(arm: str, pitch: float = 0.0, roll: float = 0.0, yaw: float = 0.0) -> np.ndarray:
    """World orientation of an arm's gripper_link: pointing at the other arm, pitched down by ``pitch`` rad
    (positive = tool pointing down), rolled by ``roll`` about its own pointing axis, yawed by ``yaw``."""
    base = _qaxis([0, 0, 1], (0.0 if arm == "left" else math.pi) + yaw)
    return _qmul(_qmul(base, _qaxis([0, 1, 0], pitch)), _qaxis([1, 0, 0], roll))


# ------------------------------------------------------------------------------------------------ waypoints
@dataclass
class Waypoint:
    t: int  # control step at which the pose is reached
    pos: np.ndarray  # tool point (world, m)
    quat: np.ndarray  # gripper_link orientation (world, wxyz)
    grip: float  # normalised gripper opening (0 closed, 1 open)


def _smooth(s: float) -> float:
    return s * s * s * (10 + s * (-15 + 6 * s))  # minimum-jerk time scaling


def _interpolate(waypoints: list[Waypoint], t: int) -> tuple[np.ndarray, np.ndarray, float]:
    if t <= waypoints[0].t:
        w = waypoints[0]
        return w.pos, w.quat, w.grip
    for a, b in zip(waypoints, waypoints[1:], strict=False):
        if a.t <= t <= b.t:
            s = 1.0 if b.t == a.t else (t - a.t) / (b.t - a.t)
            ss = _smooth(s)
            return (a.pos + ss * (b.pos - a.pos), _qslerp(a.quat, b.quat, ss), a.grip + s * (b.grip - a.grip))
    w = waypoints[-1]
    return w.pos, w.quat, w.grip


@dataclass
class _Plan:
    """Waypoints per arm, plus re-planning hooks: at control step t, ``hooks[t](sim, plan)`` may rewrite the
    waypoints after t using the end-effector sim's privileged object poses (closed loop inside the planner)."""

    left: list[Waypoint]
    right: list[Waypoint]
    hooks: dict[int, Any]


def _replace_after(wps: list[Waypoint], t: int, new: list[Waypoint]) -> None:
    wps[:] = [w for w in wps if w.t <= t] + new


# Tunables of the scripts (module-level so experiments can tweak them). Times are control steps (50 Hz):
# both tasks are done (reward 4) by step ~250, inside gym-aloha's registered 300-step limit.
TC = {"hold_pitch": 10.0, "left_dx": 0.025, "left_dz": 0.0, "meet": (0.0, 0.5, 0.22), "right_dx": 0.03,
      # right: above cube, at cube, closed, lifted, at meeting point, opens, retreated
      "t_right": (55, 90, 110, 125, 170, 235, 255, 290),
      # left: starts, pre-grasp, re-plan, approach, closed, retreated
      "t_left": (60, 150, 172, 205, 225, 290)}


def _transfer_cube_plan(box: np.ndarray, left0: Waypoint, right0: Waypoint) -> _Plan:
    cube = np.array([box[0], box[1], 0.02])  # resting height of the cube centre on the table
    meet = np.array(TC["meet"])
    pick_q = gripper_quat("right", pitch=math.radians(60))
    hold_q = gripper_quat("right", pitch=math.radians(TC["hold_pitch"]))
    left_q = gripper_quat("left", pitch=0.0, roll=math.radians(90))
    rmeet = meet + [TC["right_dx"], 0, 0.0]
    r = TC["t_right"]
    right = [
        right0,
        Waypoint(r[0], cube + [0.02, 0, 0.10], pick_q, 1.0),
        Waypoint(r[1], cube + [0.0, 0, 0.005], pick_q, 1.0),
        Waypoint(r[2], cube + [0.0, 0, 0.005], pick_q, 0.0),
        Waypoint(r[3], cube + [0.0, 0, 0.06], pick_q, 0.0),
        Waypoint(r[4], rmeet, hold_q, 0.0),
        Waypoint(r[5], rmeet, hold_q, 0.0),
        Waypoint(r[6], rmeet, hold_q, 1.0),
        Waypoint(r[7], rmeet + [0.12, 0, 0.03], hold_q, 1.0),
    ]
    lt = TC["t_left"]
    left = [
        left0,
        Waypoint(lt[0], left0.pos, left0.quat, 0.0),
        Waypoint(lt[1], meet + [-0.12, 0, 0.0], left_q, 1.0),
    ]

    def approach(sim: EndEffectorSim, plan: _Plan) -> None:  # go where the cube really is, once it's there
        grasp = sim.body_pos("box") + [TC["left_dx"], 0, TC["left_dz"]]
        _replace_after(plan.left, lt[2], [
            Waypoint(lt[3], grasp, left_q, 1.0),
            Waypoint(lt[4], grasp, left_q, 0.0),
            Waypoint(r[6], grasp, left_q, 0.0),
            Waypoint(lt[5], grasp + [-0.06, 0, 0.02], left_q, 0.0),
        ])

    return _Plan(left, right, {lt[2]: approach})


IN = {"lpitch": 60.0, "rpitch": 60.0, "meet": (0.0, 0.5, 0.15), "peg_dx": 0.02, "sock_dx": 0.0, "peg_dz": 0.012,
      "sock_dz": 0.01, "depth": 0.005, "pre": 0.03, "left_x": -0.10,
      # both: above, at object, closed, lifted, at meeting point; then re-plan, peg at mouth, inserted
      "t": (55, 90, 115, 150, 190, 200, 222, 255)}


def _insertion_plan(poses: np.ndarray, left0: Waypoint, right0: Waypoint) -> _Plan:
    peg = np.array([poses[0], poses[1], 0.01])  # resting heights of the centres on the table
    socket = np.array([poses[7], poses[8], 0.022])
    meet = np.array(IN["meet"])
    lq = gripper_quat("left", pitch=math.radians(IN["lpitch"]))
    rq = gripper_quat("right", pitch=math.radians(IN["rpitch"]))
    peg_grip = peg + [IN["peg_dx"], 0, IN["peg_dz"]]  # a bit towards the far (+x) end of the peg
    sock_grip = socket + [IN["sock_dx"], 0, IN["sock_dz"]]
    # lift: the left carries the socket to the meeting point, the right brings the peg in line, well clear
    left_hold = meet + [IN["left_x"], 0, 0] + (sock_grip - socket)
    right_pre = meet + [IN["left_x"] + 0.06 + 0.06 + 0.08, 0, 0] + (peg_grip - peg)
    t = IN["t"]
    left = [
        left0,
        Waypoint(t[0], sock_grip + [-0.02, 0, 0.10], lq, 1.0),
        Waypoint(t[1], sock_grip, lq, 1.0),
        Waypoint(t[2], sock_grip, lq, 0.0),
        Waypoint(t[3], sock_grip + [0, 0, 0.08], lq, 0.0),
        Waypoint(t[4], left_hold, lq, 0.0),
    ]
    right = [
        right0,
        Waypoint(t[0], peg_grip + [0.02, 0, 0.10], rq, 1.0),
        Waypoint(t[1], peg_grip, rq, 1.0),
        Waypoint(t[2], peg_grip, rq, 0.0),
        Waypoint(t[3], peg_grip + [0, 0, 0.08], rq, 0.0),
        Waypoint(t[4], right_pre, rq, 0.0),
    ]

    def align(sim: EndEffectorSim, plan: _Plan) -> None:
        # where the objects really are: move the peg tip onto the socket axis, then push it onto the pin
        tip = sim.body_point("peg", [-0.06, 0, 0])
        mouth = sim.body_point("socket", [0.06, 0, 0])
        axis = sim.body_point("socket", [1.0, 0, 0]) - sim.body_pos("socket")
        tool, _ = sim.tool_pose("right")
        pre = tool + (mouth + IN["pre"] * axis - tip)
        ins = tool + (mouth - (0.02 + IN["depth"]) * axis - tip)  # the pin starts 2 cm inside the mouth
        _replace_after(plan.right, t[5], [Waypoint(t[6], pre, rq, 0.0), Waypoint(t[7], ins, rq, 0.0)])

    return _Plan(left, right, {t[5]: align})


# ------------------------------------------------------------------------------------- end-effector simulation
class EndEffectorSim:
    """The mocap (end-effector) scene of a task with stiff welds; plans and records joint trajectories."""

    def __init__(self, task: str):
        self.task = task
        path = _assets_dir() / f"bimanual_viperx_end_effector_{task}.xml"
        self.model = mujoco.MjModel.from_xml_path(str(path))
        self.data = mujoco.MjData(self.model)
        m = self.model
        for i in range(m.neq):
            if m.eq_type[i] == mujoco.mjtEq.mjEQ_WELD:
                m.eq_solimp[i] = STIFF_WELD_SOLIMP
                m.eq_solref[i] = STIFF_WELD_SOLREF
        # Weak springs pulling forearm roll and wrist rotate towards 0: near the wrist singularity (gripper in
        # line with the forearm) the weld "IK" otherwise resolves the redundancy by spinning both by +-pi.
        for arm in ("left", "right"):
            for joint in ("forearm_roll", "wrist_rotate"):
                j = m.joint(f"vx300s_{arm}/{joint}").id
                m.jnt_stiffness[j] = ROLL_SPRING
                m.qpos_spring[m.jnt_qposadr[j]] = 0.0
        self.n_sub = int(round(DT / m.opt.timestep))
        self._targets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.grip_body = {arm: m.body(f"vx300s_{arm}/gripper_link").id for arm in ("left", "right")}
        self.mocap = {arm: m.body_mocapid[m.body(f"mocap_{arm}").id] for arm in ("left", "right")}
        # weld: pose of gripper_link (body2) in the mocap frame (body1), computed by the compiler from qpos0
        self.rel = {}
        for i in range(m.neq):
            b2 = m.eq_obj2id[i]
            for arm in ("left", "right"):
                if b2 == self.grip_body[arm]:
                    self.rel[arm] = (m.eq_data[i, 3:6].copy(), m.eq_data[i, 6:10].copy())
        if set(self.rel) != {"left", "right"}:
            raise RuntimeError("unexpected gym-aloha end-effector model: welds not found")

    def _object_qpos_slices(self) -> list[tuple[int, int]]:
        m = self.model
        names = ["red_box_joint"] if self.task == "transfer_cube" else ["red_peg_joint", "blue_socket_joint"]
        return [(int(m.jnt_qposadr[m.joint(n).id]), 7) for n in names]

    def reset(self, object_poses: np.ndarray) -> None:
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        d.qpos[:16] = START_ARM_POSE
        for k, (adr, n) in enumerate(self._object_qpos_slices()):
            d.qpos[adr:adr + n] = object_poses[7 * k:7 * k + 7]
        mujoco.mj_forward(m, d)
        self._anchor_mocaps()
        grip = self.joint_gripper_norm()
        self._set_grippers(grip[0], grip[1])
        mujoco.mj_forward(m, d)

    def body_pos(self, body: str) -> np.ndarray:
        return self.data.body(body).xpos.copy()

    def body_point(self, body: str, local: Sequence[float]) -> np.ndarray:
        b = self.data.body(body)
        return b.xpos + b.xmat.reshape(3, 3) @ np.asarray(local, dtype=np.float64)

    def tool_pose(self, arm: str) -> tuple[np.ndarray, np.ndarray]:
        d = self.data
        gpos, gquat = d.xpos[self.grip_body[arm]].copy(), d.xquat[self.grip_body[arm]].copy()
        return gpos + _qrot(gquat, np.array([TOOL_DEPTH, 0, 0])), gquat

    def joint_gripper_norm(self) -> tuple[float, float]:
        q = self.data.qpos
        return tuple(float((q[i] - GRIPPER_POS_CLOSE) / (GRIPPER_POS_OPEN - GRIPPER_POS_CLOSE)) for i in (6, 14))

    def _set_grippers(self, left: float, right: float) -> None:
        gl = left * (GRIPPER_POS_OPEN - GRIPPER_POS_CLOSE) + GRIPPER_POS_CLOSE
        gr = right * (GRIPPER_POS_OPEN - GRIPPER_POS_CLOSE) + GRIPPER_POS_CLOSE
        self.data.ctrl[:4] = [gl, -gl, gr, -gr]

    def set_tool_target(self, arm: str, pos: np.ndarray, quat: np.ndarray) -> None:
        """Target tool pose for the end of the next control step (the mocap glides there during the step)."""
        rpos, rquat = self.rel[arm]
        gpos = pos - _qrot(quat, np.array([TOOL_DEPTH, 0, 0]))
        mquat = _qmul(quat, _qconj(rquat))
        self._targets[arm] = (gpos - _qrot(mquat, rpos), mquat)

    def step(self) -> None:
        # Moving the mocap in one jump per 20 ms control step jerks the stiff weld (and shakes grasped objects
        # loose); glide it over the physics substeps instead.
        d = self.data
        starts = {arm: (d.mocap_pos[self.mocap[arm]].copy(), d.mocap_quat[self.mocap[arm]].copy())
                  for arm in self._targets}
        for k in range(1, self.n_sub + 1):
            s = k / self.n_sub
            for arm, (pos, quat) in self._targets.items():
                p0, q0 = starts[arm]
                d.mocap_pos[self.mocap[arm]] = p0 + s * (pos - p0)
                d.mocap_quat[self.mocap[arm]] = _qslerp(q0, quat, s)
            mujoco.mj_step(self.model, d)
        self._targets = {}

    def arm_qpos(self) -> np.ndarray:
        q = self.data.qpos
        return np.concatenate([q[0:6], q[8:14]])

    def sync_from(self, data: mujoco.MjData) -> None:
        """Copy the state of a joint-space scene (same joints) into this sim; re-anchor the mocaps."""
        d = self.data
        d.qpos[:] = data.qpos[: self.model.nq]
        d.qvel[:] = data.qvel[: self.model.nv]
        mujoco.mj_forward(self.model, d)
        self._anchor_mocaps()
        mujoco.mj_forward(self.model, d)

    def _anchor_mocaps(self) -> None:
        d = self.data
        for arm in ("left", "right"):  # put the mocap exactly where the weld is satisfied: no jerk
            gpos, gquat = d.xpos[self.grip_body[arm]], d.xquat[self.grip_body[arm]]
            rpos, rquat = self.rel[arm]
            mquat = _qmul(gquat, _qconj(rquat))
            d.mocap_quat[self.mocap[arm]] = mquat
            d.mocap_pos[self.mocap[arm]] = gpos - _qrot(mquat, rpos)
        self._targets = {}


def _physics_data(physics: Any) -> mujoco.MjData | None:
    """MjData from a dm_control Physics, a gym-aloha AlohaEnv (possibly wrapped), or an MjData; else None."""
    if physics is None:
        return None
    if isinstance(physics, mujoco.MjData):
        return physics
    env = getattr(physics, "unwrapped", physics)
    inner = getattr(env, "_env", None)  # gym_aloha.env.AlohaEnv keeps a dm_control Environment here
    if inner is not None and hasattr(inner, "physics"):
        physics = inner.physics
    data = getattr(physics, "data", None)
    ptr = getattr(data, "ptr", None)
    if isinstance(ptr, mujoco.MjData):
        return ptr
    raise TypeError(f"cannot read MuJoCo state from {type(physics).__name__}")


class ScriptedAlohaPolicy:
    """Scripted bimanual expert for gym-aloha ``transfer_cube`` / ``insertion`` (joint-position actions).

    Construct it with the seed the env was reset with (``AlohaEnv.reset(seed=seed)`` places the objects with
    ``gym_aloha.utils.sample_*_pose(seed)``) or with the object poses (``object_poses``: [7] cube pose, or [14]
    peg pose + socket pose, xyz + wxyz quaternion). Each ``policy.step(obs, physics=None)`` (also
    ``policy(obs)``) advances its internal end-effector sim by one control step and returns the 14-d action.

    * Closed loop: pass the controlled env's state as ``physics`` (a gym-aloha ``AlohaEnv``, its dm_control
      ``Physics`` or an ``MjData``); at the script's re-planning steps (``replan_steps``: cube hand-over, peg
      alignment) the planner copies that state in and re-plans from where the objects really are.
    * Without ``physics`` the policy steps a private copy of gym-aloha's joint-space scene with its own actions
      (``shadow=True``, the default; ~+50 % planning time) and re-plans from that: identical to closed loop
      when the real env is gym-aloha's (deterministic, same XML and stepping). ``shadow=False`` plans from
      the end-effector sim alone (pure open loop: fine for transfer_cube, insertion then mostly fails).

    ``policy.plan(n)`` returns the open-loop [n, 14] trajectory. ``reset(...)`` starts a new episode.
    """

    def __init__(self, task: AlohaTask, seed: int | None = None, object_poses: np.ndarray | None = None,
                 shadow: bool = True, _sim: EndEffectorSim | None = None):
        if task not in TASKS:
            raise ValueError(f"unknown aloha task {task!r}; expected one of {TASKS}")
        self.task = task
        self._sim = _sim if _sim is not None else EndEffectorSim(task)
        self._use_shadow = shadow
        self._shadow: JointSim | None = None
        self._shadow_live = False
        self.reset(seed=seed, object_poses=object_poses)

    def reset(self, seed: int | None = None, object_poses: np.ndarray | None = None) -> None:
        if object_poses is None:
            if seed is None:
                raise ValueError("give either seed or object_poses")
            object_poses = initial_object_poses(self.task, seed)
        self.seed = seed
        self.object_poses = np.asarray(object_poses, dtype=np.float64)
        sim = self._sim
        sim.reset(self.object_poses)
        starts = {}
        for arm, g in zip(("left", "right"), sim.joint_gripper_norm(), strict=True):
            pos, quat = sim.tool_pose(arm)
            starts[arm] = Waypoint(0, pos, quat, g)
        planner = _transfer_cube_plan if self.task == "transfer_cube" else _insertion_plan
        self._plan = planner(self.object_poses, starts["left"], starts["right"])
        self.t = 0
        self._shadow_live = False  # started lazily, on the first step without physics

    @property
    def replan_steps(self) -> list[int]:
        """Control steps at which a closed-loop caller's ``physics`` is read."""
        return sorted(self._plan.hooks)

    def step(self, observation: Any = None, physics: Any = None) -> np.ndarray:
        sim, plan, t = self._sim, self._plan, self.t
        if physics is None and self._use_shadow and (t == 0 or self._shadow_live):
            if self._shadow is None:
                self._shadow = JointSim(self.task)
            if t == 0:
                self._shadow.reset(self.object_poses)
                self._shadow_live = True
            physics = self._shadow.physics
        else:
            self._shadow_live = False
        if t in plan.hooks:
            data = _physics_data(physics)
            if data is not None:
                sim.sync_from(data)
            plan.hooks[t](sim, plan)
        grips = []
        for arm, wps in (("left", plan.left), ("right", plan.right)):
            pos, quat, grip = _interpolate(wps, t + 1)
            sim.set_tool_target(arm, pos, quat)
            grips.append(grip)
        sim._set_grippers(*grips)
        sim.step()
        arms = sim.arm_qpos()  # where the arms are after this step: the joint target for action t
        action = np.concatenate([arms[:6], [grips[0]], arms[6:], [grips[1]]]).astype(np.float32)
        if self._shadow_live and self._shadow is not None:
            self._shadow.step(action)
        self.t += 1
        return action

    __call__ = step

    def plan(self, steps: int = 400) -> np.ndarray:
        """Restart this episode and return its whole [steps, 14] joint trajectory (no external physics)."""
        self.reset(seed=self.seed, object_poses=self.object_poses)
        out = np.stack([self.step() for _ in range(steps)])
        self.reset(seed=self.seed, object_poses=self.object_poses)
        return out


# --------------------------------------------------------------------------------------- joint-space replay
class JointSim:
    """The joint-position scene with gym-aloha's task (reward) and dm_control stepping, minus its rendering."""

    def __init__(self, task: str):
        from dm_control import mujoco as dm_mujoco
        from dm_control.rl import control
        from gym_aloha.tasks import sim as aloha_sim

        base = aloha_sim.TransferCubeTask if task == "transfer_cube" else aloha_sim.InsertionTask

        class _NoRenderTask(base):  # type: ignore[misc, valid-type]
            def get_observation(self, physics):  # gym-aloha renders 3 cameras at 640x480 here; we don't
                return {"qpos": self.get_qpos(physics)}

        self._box_pose = aloha_sim.BOX_POSE
        self.task = task
        self.physics = dm_mujoco.Physics.from_xml_path(str(_assets_dir() / f"bimanual_viperx_{task}.xml"))
        self.env = control.Environment(self.physics, _NoRenderTask(), time_limit=float("inf"),
                                       control_timestep=DT, n_sub_steps=None, flat_observation=False)
        self.max_reward = 4

    @property
    def model(self) -> mujoco.MjModel:
        return self.physics.model.ptr

    @property
    def data(self) -> mujoco.MjData:
        return self.physics.data.ptr

    def reset(self, object_poses: np.ndarray | None) -> np.ndarray:
        if object_poses is None:  # random-reachable: park the objects where gym-aloha's default pose puts them
            object_poses = initial_object_poses(self.task, 0)
        self._box_pose[0] = np.asarray(object_poses, dtype=np.float64)
        ts = self.env.reset()
        return np.asarray(ts.observation["qpos"], dtype=np.float64)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float]:
        ts = self.env.step(np.asarray(action, dtype=np.float64))
        return np.asarray(ts.observation["qpos"], dtype=np.float64), float(ts.reward or 0.0)


def _views(cameras: Sequence[str]) -> list[str]:
    cams = list(cameras)
    if not cams:
        raise ValueError("need at least one camera")
    return cams


def _rollout(sim: JointSim, renderer: FastRenderer | None, cameras: list[str], steps: int,
             act: Any, object_poses: np.ndarray | None,
             ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, list[float]]:
    """Reset the joint scene, then for t < steps: render, record qpos, ``a = act(t)``, step. ``act`` may read
    ``sim.physics`` (closed loop)."""
    h, w = (renderer.height, renderer.width) if renderer is not None else (0, 0)
    frames = {c: np.empty((steps, h, w, 3), dtype=np.uint8) for c in cameras} if renderer is not None else {}
    state = np.empty((steps, STATE_DIM), dtype=np.float32)
    actions = np.empty((steps, ACTION_DIM), dtype=np.float32)
    rewards: list[float] = []
    qpos = sim.reset(object_poses)
    for t in range(steps):
        if renderer is not None:
            for c in cameras:
                frames[c][t] = renderer.render(sim.data, c)
        state[t] = qpos
        actions[t] = act(t)
        qpos, reward = sim.step(actions[t])
        rewards.append(reward)
    return frames, state, actions, rewards


def aloha_episodes(task: AlohaTask, n: int, seed: int, image_size: tuple[int, int] = (64, 64),
                   cameras: Sequence[str] = ("top",), max_steps: int = 400,
                   id_prefix: str = "aloha") -> Iterator[dict[str, Any]]:
    """``n`` scripted gym-aloha demos of ``task`` on seeds ``seed, seed+1, ...`` (episode k uses seed+k, the
    seed ``AlohaEnv.reset`` would take). Frames [T,H,W,3] per camera (``top``, ``angle``, ``left_wrist``,
    ``right_wrist``, ``front_close``, ...), actions [T,14] joint targets, state [T,14] qpos, T = max_steps,
    fps 50. ``extra["success"]``: the env reward reached its max (4) at some step."""
    if task not in TASKS:
        raise ValueError(f"unknown aloha task {task!r}; expected one of {TASKS}")
    cams = _views(cameras)
    h, w = image_size
    ee = EndEffectorSim(task)
    sim = JointSim(task)
    renderer = FastRenderer(sim.model, h, w)
    try:
        for k in range(n):
            ep_seed = seed + k
            policy = ScriptedAlohaPolicy(task, seed=ep_seed, _sim=ee)
            frames, state, actions, rewards = _rollout(
                sim, renderer, cams, max_steps, lambda t, p=policy: p.step(physics=sim.physics), policy.object_poses)
            max_reward = max(rewards) if rewards else 0.0
            yield dict(
                episode_id=f"{id_prefix}_{task}_s{ep_seed}",
                frames=frames,
                actions=actions,
                state=state,
                instructions=[INSTRUCTIONS[task]],
                fps=float(FPS),
                embodiment="aloha",
                source=f"sim/gym-aloha/{task}",
                extra={"task": task, "seed": int(ep_seed), "success": bool(max_reward >= sim.max_reward),
                       "max_reward": float(max_reward), "final_reward": float(rewards[-1]) if rewards else 0.0,
                       "sim": "gym-aloha"},
            )
    finally:
        renderer.close()


def scripted_success(task: AlohaTask, seeds: Sequence[int], max_steps: int = 400,
                     shadow: bool = True) -> dict[int, bool]:
    """Success (max reward reached) of ``ScriptedAlohaPolicy`` per seed, run as an evaluator would: the policy
    only gets the seed; the env is gym-aloha's joint-space scene (``AlohaEnv`` physics, without its rendering)."""
    env = JointSim(task)
    policy = ScriptedAlohaPolicy(task, seed=seeds[0] if len(seeds) else 0, shadow=shadow)
    out: dict[int, bool] = {}
    for s in seeds:
        policy.reset(seed=s)
        _, _, _, rewards = _rollout(env, None, [], max_steps, lambda t: policy.step(), policy.object_poses)
        out[int(s)] = bool(max(rewards, default=0.0) >= env.max_reward)
    return out


# ----------------------------------------------------------------------------------- random reachable motion
ARM_JOINT_ADDR = (0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13)  # qpos addresses of the 12 arm joints


def joint_limits(model: mujoco.MjModel, margin: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """[12] lower/upper bounds of the arm joints from ``jnt_range``, shrunk by ``margin`` of the range on each side."""
    lo, hi = [], []
    for adr in ARM_JOINT_ADDR:
        j = int(np.where(model.jnt_qposadr == adr)[0][0])
        a, b = model.jnt_range[j]
        pad = margin * (b - a)
        lo.append(a + pad)
        hi.append(b - pad)
    return np.array(lo), np.array(hi)


# Random targets live in a box around where the scripted demos work (inside the joint limits), per joint
# (waist, shoulder, elbow, forearm roll, wrist angle, wrist rotate): centre and half-width in rad.
_RANDOM_CENTER = np.array([0.0, -0.45, 0.9, 0.0, 0.0, 0.0])
_RANDOM_HALF_SPAN = np.array([0.6, 0.5, 0.4, 0.7, 0.8, 1.2])
MAX_JOINT_SPEED = 2.0  # rad/s, average over a segment (ViperX joints top out around pi rad/s)
MIN_GRIPPER_HEIGHT = 0.06  # m, gripper links above the table top
MIN_GRIPPER_GAP = 0.15  # m, between the two gripper links


class _Reachability:
    """Forward-kinematics check of a 12-d arm configuration: grippers above the table and apart."""

    def __init__(self, model: mujoco.MjModel):
        self.model, self.data = model, mujoco.MjData(model)
        self.bodies = [model.body(f"vx300s_{arm}/{part}").id for arm in ("left", "right")
                       for part in ("gripper_link", "left_finger_link", "right_finger_link")]
        self.grippers = [model.body(f"vx300s_{arm}/gripper_link").id for arm in ("left", "right")]

    def ok(self, arms: np.ndarray) -> bool:
        d = self.data
        d.qpos[list(ARM_JOINT_ADDR)] = arms
        mujoco.mj_kinematics(self.model, d)
        if min(d.xpos[b][2] for b in self.bodies) < MIN_GRIPPER_HEIGHT:
            return False
        g0, g1 = (d.xpos[b] for b in self.grippers)
        return bool(np.linalg.norm(g0 - g1) >= MIN_GRIPPER_GAP)


def _random_targets(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, count: int,
                    start: np.ndarray, max_step: float, reach: _Reachability) -> np.ndarray:
    center = np.concatenate([_RANDOM_CENTER, _RANDOM_CENTER])
    span = np.concatenate([_RANDOM_HALF_SPAN, _RANDOM_HALF_SPAN])
    box_lo, box_hi = np.maximum(lo, center - span), np.minimum(hi, center + span)
    out, prev = [], start
    for _ in range(count):
        for _attempt in range(200):  # rejection sampling: reachable without hitting the table / other arm
            cand = prev + np.clip(rng.uniform(box_lo, box_hi) - prev, -max_step, max_step)  # bounded speed
            if reach.ok(cand):
                break
        else:
            cand = prev
        out.append(cand)
        prev = cand
    return np.array(out)


def aloha_random_reachable_episodes(n: int, seed: int, image_size: tuple[int, int] = (64, 64),
                                    cameras: Sequence[str] = ("top",), steps_per_target: int = 25,
                                    targets_per_episode: int = 4,
                                    id_prefix: str = "aloha_rand") -> Iterator[dict[str, Any]]:
    """Task-agnostic ALOHA motion (pyramid level 4): random joint targets inside the joint limits (``jnt_range``
    minus a 10 % safety margin, intersected with a box around the demos' working poses) that forward
    kinematics says keep both grippers >= 6 cm above the table and >= 15 cm apart, at most ``MAX_JOINT_SPEED``
    rad/s on average per segment, grippers randomly open/closed, joined with minimum-jerk interpolation and
    executed as 14-d joint-position actions in the transfer-cube scene (the cube stays at its seed-0 spot).
    T = steps_per_target * targets_per_episode frames at 50 fps; no instruction."""
    cams = _views(cameras)
    h, w = image_size
    sim = JointSim("transfer_cube")
    lo, hi = joint_limits(sim.model)
    reach = _Reachability(sim.model)
    renderer = FastRenderer(sim.model, h, w)
    steps = steps_per_target * targets_per_episode
    try:
        for k in range(n):
            ep_seed = seed + k
            rng = np.random.default_rng([ep_seed, 4])
            start = np.concatenate([START_ARM_POSE[0:6], START_ARM_POSE[8:14]])
            targets = _random_targets(rng, lo, hi, targets_per_episode, start,
                                      MAX_JOINT_SPEED * steps_per_target * DT, reach)
            grips = rng.integers(0, 2, size=(targets_per_episode, 2)).astype(np.float64)
            g0 = np.array([(START_ARM_POSE[6] - GRIPPER_POS_CLOSE) / (GRIPPER_POS_OPEN - GRIPPER_POS_CLOSE)] * 2)
            actions = np.empty((steps, ACTION_DIM), dtype=np.float64)
            prev_q, prev_g = start, g0
            for i in range(targets_per_episode):
                for j in range(steps_per_target):
                    s = _smooth((j + 1) / steps_per_target)
                    q = prev_q + s * (targets[i] - prev_q)
                    g = prev_g + s * (grips[i] - prev_g)
                    actions[i * steps_per_target + j] = np.concatenate([q[:6], [g[0]], q[6:], [g[1]]])
                prev_q, prev_g = targets[i], grips[i]
            actions = actions.astype(np.float32)
            frames, state, _, _ = _rollout(sim, renderer, cams, steps, lambda t, a=actions: a[t], None)
            yield dict(
                episode_id=f"{id_prefix}_s{ep_seed}",
                frames=frames,
                actions=actions,
                state=state,
                instructions=[],
                fps=float(FPS),
                embodiment="aloha",
                source="sim/gym-aloha/random-reachable",
                extra={"sim": "gym-aloha", "kind": "random-reachable", "seed": int(ep_seed),
                       "steps_per_target": int(steps_per_target), "targets_per_episode": int(targets_per_episode)},
            )
    finally:
        renderer.close()
