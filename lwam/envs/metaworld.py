"""Meta-World (v3 tasks) with rendered cameras, scripted experts and LeRobot demo collection.

Cameras: ``"corner"`` (a fixed view of arm, table and object; Meta-World renders it upside down, so it
is flipped here) and ``"gripper"`` (alias of Meta-World's ``gripperPOV``, looking down from the
gripper). Any Meta-World camera name works (``topview``, ``corner2``..``corner4``, ``behindGripper``).
Rendering is on the CPU through EGL (``MUJOCO_GL=egl``) with multisampling, shadows and reflections
off: those three dominate software-rendering time at 64x64 and add nothing the policy needs.

Seeds: the object / goal positions of an episode are drawn from the task's reset space with
``numpy.random.default_rng((seed, crc32(task_name)))`` (Meta-World ML1-style: one fixed random vector per
seed). Demo collection uses seeds ``seed, seed+1, ...`` (default from 0, see :data:`COLLECT_SEED_START`);
evaluation uses seeds from :data:`EVAL_SEED_START` = 1_000_000 upwards, so the two never overlap as long
as fewer than a million collection attempts are made per task.
"""
from __future__ import annotations

import atexit
import os
import time
import weakref
import zlib
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("MUJOCO_GL", "egl")
if os.environ.get("MUJOCO_GL") == "egl":
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import numpy as np  # noqa: E402

# Triton's native library carries its own LLVM. Loaded after Mesa's software EGL (which links the
# system LLVM) it segfaults on import, so load it first whenever it is installed: the model's fused
# ops may import it later in the same process.
try:  # noqa: SIM105
    import triton.runtime  # noqa: E402,F401
except ImportError:
    pass

COLLECT_SEED_START = 0
EVAL_SEED_START = 1_000_000
FPS = 80  # Meta-World control rate: frame_skip 5 x 2.5 ms

CAMERA_ALIASES = {"gripper": "gripperPOV", "wrist": "gripperPOV", "behind": "behindGripper"}
_FLIPPED = {"corner", "corner2", "corner3", "corner4"}

INSTRUCTIONS = {
    "button-press-topdown-v3": "press the button from the top",
    "button-press-v3": "press the button",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "door-open-v3": "open the door",
    "door-close-v3": "close the door",
    "reach-v3": "reach to the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "handle-press-v3": "press the handle down",
    "coffee-button-v3": "press the coffee machine button",
    "plate-slide-v3": "slide the plate into the goal",
    "lever-pull-v3": "pull the lever up",
}


def instruction_for(task: str) -> str:
    """The instruction sentence of a task (derived from the name for tasks not in INSTRUCTIONS)."""
    if task in INSTRUCTIONS:
        return INSTRUCTIONS[task]
    words = task.removesuffix("-v3").removesuffix("-v2").replace("-", " ")
    return f"{words} task"


def task_names() -> list[str]:
    """All Meta-World v3 task names."""
    import metaworld.env_dict as ed

    return sorted(ed.ALL_V3_ENVIRONMENTS)


def _ensure_headless_gl(mujoco: Any) -> None:
    """If mujoco was imported before this module (so MUJOCO_GL was unset) it picked GLFW, which aborts
    the process without a display; switch its renderer to EGL in that case."""
    from mujoco import gl_context

    ctx = getattr(gl_context, "GLContext", None)
    if ctx is None or ctx.__module__ != "mujoco.glfw" or os.environ.get("DISPLAY"):
        return
    try:
        from mujoco.egl import GLContext as EGLContext
    except Exception as e:  # noqa: BLE001
        raise RuntimeError("mujoco was imported with the GLFW backend and no display; set MUJOCO_GL=egl "
                           f"before importing mujoco ({e})") from e
    gl_context.GLContext = EGLContext
    from lwam._logging import log_once

    log_once("metaworld.egl", "mujoco was imported before lwam.envs.metaworld; switched its renderer to EGL")


_LIVE: "weakref.WeakSet[MetaWorldTask]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for task in list(_LIVE):
        task.close()


class MetaWorldTask:
    """One Meta-World task with rendered cameras.

    Args:
        name: v3 task name, e.g. "button-press-topdown-v3".
        cameras: camera names (see module doc); images come back under these names.
        size: square image side in pixels (even).
        seed: seed of the first ``reset()`` without an explicit seed.
        max_steps: episode step limit (``done`` becomes True when reached; <= 500).

    Observations are dicts: ``images`` {camera: uint8 [size, size, 3]}, ``proprio`` float32 [4]
    (hand xyz + gripper opening in [0, 1]), ``instruction`` str.
    """

    action_dim = 4
    proprio_dim = 4

    def __init__(self, name: str, cameras: Sequence[str] = ("corner", "gripper"), size: int = 64,
                 seed: int = 0, max_steps: int = 500):
        import metaworld.env_dict as ed
        import mujoco
        from metaworld.policies import ENV_POLICY_MAP

        if name not in ed.ALL_V3_ENVIRONMENTS:
            raise ValueError(f"name: unknown Meta-World v3 task {name!r}; known: {sorted(ed.ALL_V3_ENVIRONMENTS)}")
        if size < 2 or size % 2:
            raise ValueError(f"size: expected an even number of pixels >= 2, got {size}")
        if not cameras:
            raise ValueError("cameras: expected at least one camera name")
        self.name = name
        self.instruction = instruction_for(name)
        self.cameras = tuple(cameras)
        self.size = int(size)
        self.max_steps = int(max_steps)
        self._next_seed = int(seed)
        env = ed.ALL_V3_ENVIRONMENTS[name]()
        kwargs = dict(ed.ML1_ARGS_KWARGS[name]["kwargs"])
        kwargs.pop("task_id", None)
        env._set_task_inner(**kwargs)
        env._set_task_called = True
        # The scripted experts read the goal from the state vector, so keep it observable.
        if env._partially_observable:
            env._partially_observable = False
            env.__dict__.pop("sawyer_observation_space", None)
        env.max_path_length = max(self.max_steps, 1)
        self.env = env
        self._expert = ENV_POLICY_MAP[name]()
        model = env.model
        names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        self._cam_ids = []
        for cam in self.cameras:
            real = CAMERA_ALIASES.get(cam, cam)
            if real not in names:
                raise ValueError(f"cameras: unknown camera {cam!r}; Meta-World has {names} "
                                 f"(aliases {CAMERA_ALIASES})")
            self._cam_ids.append((names.index(real), real in _FLIPPED))
        _ensure_headless_gl(mujoco)
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.size)
        self._mujoco = mujoco
        self._renderer = mujoco.Renderer(model, self.size, self.size)
        # Layouts come from the episode seed. Meta-World's frozen reset vector cannot be used for that: a task
        # that rejects a layout redraws in a loop in reset_model (reach, push, pick-place, ...), which spins
        # forever on a frozen vector. Instead each reset_model call (env.reset makes two) restarts the episode's
        # seeded stream, so both calls end on the same accepted layout.
        self._layout_stream = None
        env._freeze_rand_vec = False
        env._get_state_rand_vec = self._next_layout
        env.reset_model = self._reset_model
        self._state: np.ndarray | None = None
        self.steps = 0
        self.seed: int | None = None
        _LIVE.add(self)

    # -- episode --------------------------------------------------------------------------
    def _rand_vecs(self, seed: int):
        """The episode's reset vectors: the first is the episode's layout; further ones are drawn from the same
        seeded stream only when the task rejects a layout (e.g. reach/push/pick-place redraw while the goal
        lies within 0.15 of the object)."""
        space = self.env._random_reset_space
        rng = np.random.default_rng((int(seed), zlib.crc32(self.name.encode())))
        while True:
            yield rng.uniform(space.low, space.high, size=space.low.size).astype(np.float64)

    def _reset_model(self):
        if self.seed is None:
            raise RuntimeError("MetaWorldTask: reset the task through MetaWorldTask.reset(seed)")
        self._layout_stream = self._rand_vecs(self.seed)
        return type(self.env).reset_model(self.env)

    def _next_layout(self) -> np.ndarray:
        self.env._last_rand_vec = next(self._layout_stream)
        return self.env._last_rand_vec

    def reset(self, seed: int | None = None) -> dict[str, Any]:
        """Start an episode with object positions drawn from ``seed`` (default: the next seed)."""
        if seed is None:
            seed = self._next_seed
        self._next_seed = int(seed) + 1
        self.seed = int(seed)
        state, _ = self.env.reset()
        self._state = state
        self.steps = 0
        return self._obs()

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool]:
        """Apply one action [4] (xyz delta, gripper effort; clipped to [-1, 1]).

        Returns (obs, reward, success, done); ``done`` is True once ``max_steps`` steps were taken.
        """
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (4,):
            raise ValueError(f"action: expected shape [4], got {tuple(np.shape(action))}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"action: expected finite values, got {a}")
        state, reward, _, _, info = self.env.step(np.clip(a, -1.0, 1.0).astype(np.float32))
        self._state = state
        self.steps += 1
        return self._obs(), float(reward), bool(info.get("success", 0.0) > 0), self.steps >= self.max_steps

    def expert_action(self, obs: dict[str, Any] | None = None) -> np.ndarray:
        """The scripted expert's action [4] float32 for the current state (``obs`` is not needed:
        the expert reads the simulator's full state vector, which stays internal)."""
        if self._state is None:
            raise RuntimeError("call reset() before expert_action()")
        return np.clip(self._expert.get_action(self._state), -1.0, 1.0).astype(np.float32)

    # -- observation ----------------------------------------------------------------------
    def render(self) -> dict[str, np.ndarray]:
        """{camera: uint8 [size, size, 3]} of the current state."""
        flags = self._mujoco.mjtRndFlag
        out = {}
        for cam, (cid, flip) in zip(self.cameras, self._cam_ids):
            self._renderer.update_scene(self.env.data, camera=cid)
            scene_flags = self._renderer.scene.flags
            scene_flags[flags.mjRND_SHADOW] = 0
            scene_flags[flags.mjRND_REFLECTION] = 0
            img = self._renderer.render()
            out[cam] = np.ascontiguousarray(img[::-1, ::-1]) if flip else img.copy()
        return out

    def proprio(self) -> np.ndarray:
        """float32 [4]: hand position xyz and gripper opening."""
        assert self._state is not None
        return np.asarray(self._state[:4], dtype=np.float32).copy()

    def _obs(self) -> dict[str, Any]:
        return {"images": self.render(), "proprio": self.proprio(), "instruction": self.instruction}

    def close(self) -> None:
        r, self._renderer = getattr(self, "_renderer", None), None
        if r is not None:
            try:
                r.close()
            except Exception:  # noqa: BLE001 - EGL teardown at interpreter exit may fail harmlessly
                pass
        env = getattr(self, "env", None)
        if env is not None:
            try:
                env.close()
            except Exception:  # noqa: BLE001
                pass
            self.env = None

    def __enter__(self) -> "MetaWorldTask":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetaWorldTask({self.name!r}, cameras={self.cameras}, size={self.size})"


def run_expert_episode(task: MetaWorldTask, seed: int, max_steps: int,
                       extra_steps: int = 10) -> tuple[bool, dict[str, Any]]:
    """Roll out the scripted expert from ``seed``.

    The episode ends ``extra_steps`` steps after the first success (or at ``max_steps``).
    Returns (success, episode) with episode = {"states" [T, 4], "actions" [T, 4],
    "images" {camera: uint8 [T, S, S, 3]}, "success_step": int or -1}; frame t is the observation the
    action t was chosen on.
    """
    obs = task.reset(seed)
    states, actions = [], []
    images: dict[str, list[np.ndarray]] = {c: [] for c in task.cameras}
    success_step, t = -1, 0
    while t < max_steps:
        a = task.expert_action()
        states.append(obs["proprio"])
        actions.append(a)
        for c in task.cameras:
            images[c].append(obs["images"][c])
        obs, _, success, _ = task.step(a)
        t += 1
        if success and success_step < 0:
            success_step = t
        if success_step >= 0 and t >= success_step + extra_steps:
            break
    episode = {"states": np.stack(states), "actions": np.stack(actions),
               "images": {c: np.stack(v) for c, v in images.items()}, "success_step": success_step}
    return success_step >= 0, episode


def collect_demos(tasks: Sequence[str], episodes_per_task: int, out_dir: str | os.PathLike,
                  cameras: Sequence[str] = ("corner", "gripper"), size: int = 64,
                  seed: int = COLLECT_SEED_START, max_steps: int = 200, extra_steps: int = 10,
                  max_attempts_factor: int = 3, progress: bool = True) -> dict[str, Any]:
    """Run the scripted experts and write a LeRobot v2.1 dataset of the successful episodes.

    Task i uses seeds ``seed, seed+1, ...`` until ``episodes_per_task`` successes (at most
    ``max_attempts_factor * episodes_per_task`` attempts). Every episode is committed to disk as soon as
    it is recorded. Videos are stored per camera under ``observation.images.<camera>``.

    Returns {"path", "episodes": {task: n}, "attempts": {task: n}, "expert_success": {task: rate},
    "frames": int, "wall_time_s": float}.
    """
    from tqdm.auto import tqdm

    from lwam.data.lerobot import LeRobotWriter

    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task: expected >= 1, got {episodes_per_task}")
    out = Path(out_dir)
    if (out / "meta" / "info.json").exists():
        raise FileExistsError(f"out_dir: {out} already holds a dataset; choose a new directory")
    t0 = time.perf_counter()
    writer = LeRobotWriter(out, fps=FPS, state_dim=4, action_dim=4, video_keys=list(cameras),
                           image_size=(size, size), robot_type="sawyer",
                           state_names=["hand_x", "hand_y", "hand_z", "gripper_open"],
                           action_names=["dx", "dy", "dz", "gripper"])
    summary: dict[str, Any] = {"path": str(out), "episodes": {}, "attempts": {}, "expert_success": {}}
    bar = tqdm(total=len(tasks) * episodes_per_task, desc="collect demos", unit="ep", disable=not progress)
    try:
        for name in tasks:
            kept = attempts = 0
            with MetaWorldTask(name, cameras=cameras, size=size, seed=seed, max_steps=max_steps) as task:
                while kept < episodes_per_task and attempts < max_attempts_factor * episodes_per_task:
                    ep_seed = seed + attempts
                    attempts += 1
                    ok, ep = run_expert_episode(task, ep_seed, max_steps, extra_steps)
                    if not ok:
                        continue
                    writer.add_episode(ep["states"], ep["actions"], ep["images"], task.instruction,
                                       extra={"env_task": name, "seed": ep_seed,
                                              "success_step": ep["success_step"]})
                    kept += 1
                    bar.update(1)
                    bar.set_postfix(task=name, frames=writer.total_frames)
            summary["episodes"][name] = kept
            summary["attempts"][name] = attempts
            summary["expert_success"][name] = kept / max(attempts, 1)
            if kept < episodes_per_task:
                from lwam._logging import logger

                logger.warning(f"{name}: the expert succeeded in only {kept} of {attempts} attempts")
    finally:
        bar.close()
    summary["frames"] = writer.total_frames
    summary["wall_time_s"] = time.perf_counter() - t0
    return summary
