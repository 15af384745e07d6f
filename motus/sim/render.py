"""Shared offscreen-rendering helpers for the MuJoCo simulator sources (Meta-World, gym-aloha).

The GL backend must be settled before PyOpenGL (``OpenGL``) is first imported -- it binds its platform once
per process -- so this module decides at import time and exports ``MUJOCO_GL`` for dm_control/MuJoCo:

* ``MUJOCO_GL`` set by the user: respected as is.
* unset: we probe headless EGL through ``libEGL`` directly (ctypes, ~0.1 s, no PyOpenGL import) and use
  ``egl`` when a device display initialises, else ``osmesa`` when ``libOSMesa`` is installed, else ``egl``
  anyway (rendering will then raise a clear error from MuJoCo).
* ``FastRenderer`` creates its GL context from that backend explicitly, so it still works when something
  imported ``mujoco`` earlier without ``MUJOCO_GL`` (MuJoCo would then have picked GLFW, which needs X11).

``FastRenderer`` renders directly at the requested (small) size with shadows, reflections, skybox and
multisampling turned off, which is roughly 10x faster than MuJoCo's defaults on a CPU (llvmpipe) EGL.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import sys
import weakref
from typing import Any

import numpy as np


def _egl_device_available() -> bool:
    """True when libEGL can initialise a headless device display (what mujoco.egl uses)."""
    try:
        name = ctypes.util.find_library("EGL")
        if not name:
            return False
        lib = ctypes.CDLL(name)
        lib.eglGetProcAddress.restype = ctypes.c_void_p
        lib.eglGetProcAddress.argtypes = [ctypes.c_char_p]
        query_ptr = lib.eglGetProcAddress(b"eglQueryDevicesEXT")
        display_ptr = lib.eglGetProcAddress(b"eglGetPlatformDisplayEXT")
        if not query_ptr or not display_ptr:
            return False
        query = ctypes.CFUNCTYPE(ctypes.c_uint, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                 ctypes.POINTER(ctypes.c_int))(query_ptr)
        get_display = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p)(display_ptr)
        lib.eglInitialize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
        lib.eglTerminate.argtypes = [ctypes.c_void_p]
        devices = (ctypes.c_void_p * 16)()
        count = ctypes.c_int()
        if not query(16, devices, ctypes.byref(count)):
            return False
        for i in range(count.value):
            display = get_display(0x313F, devices[i], None)  # EGL_PLATFORM_DEVICE_EXT
            if not display:
                continue
            major, minor = ctypes.c_int(), ctypes.c_int()
            if lib.eglInitialize(display, ctypes.byref(major), ctypes.byref(minor)):
                lib.eglTerminate(display)
                return True
        return False
    except Exception:  # noqa: BLE001 - any failure means "no EGL"
        return False


def _choose_gl_backend() -> str:
    chosen = os.environ.get("MUJOCO_GL", "").strip().lower()
    if chosen:
        return chosen
    if "OpenGL" in sys.modules:
        # PyOpenGL already bound its platform: follow it (mujoco.egl/osmesa require a matching platform).
        platform = os.environ.get("PYOPENGL_PLATFORM", "").strip().lower()
        backend = platform if platform in ("egl", "osmesa") else "egl"
    else:
        backend = "egl"
        if not _egl_device_available() and ctypes.util.find_library("OSMesa"):
            backend = "osmesa"
            os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    os.environ["MUJOCO_GL"] = backend  # for mujoco/dm_control if they are imported after us
    return backend


GL_BACKEND = _choose_gl_backend()

import mujoco  # noqa: E402  (must come after the backend choice)


def decimate_meshes_for_rendering(model: mujoco.MjModel, cell: float, min_faces: int = 64) -> tuple[int, int]:
    """Cut the triangles the renderer draws by vertex clustering (in place; returns faces before/after).

    Vertices falling in the same ``cell``-sized grid cell (mesh frame, metres) are merged into the first one;
    faces that collapse are dropped and the survivors moved to the front of each mesh's face block, with
    ``mesh_facenum`` shrunk accordingly. Vertex positions are untouched and MuJoCo collides meshes through
    their convex hulls (``mesh_graph``), so dynamics are unchanged (checked bit-for-bit in the tests). The
    software (llvmpipe) rasteriser is vertex-bound at small image sizes: ~3.5x fewer ALOHA triangles at
    4 mm makes a 64x64 frame ~2.5x faster with no visible change.
    """
    before = after = 0
    for i in range(model.nmesh):
        fa, fn = int(model.mesh_faceadr[i]), int(model.mesh_facenum[i])
        va, vn = int(model.mesh_vertadr[i]), int(model.mesh_vertnum[i])
        before += fn
        if fn < min_faces or vn == 0:
            after += fn
            continue
        keys = np.floor(model.mesh_vert[va:va + vn] / cell).astype(np.int64)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        rep = first[inverse.reshape(-1)]
        faces = rep[model.mesh_face[fa:fa + fn]]
        keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
        k = int(keep.sum())
        normals = model.mesh_facenormal[fa:fa + fn][keep].copy()
        texcoords = model.mesh_facetexcoord[fa:fa + fn][keep].copy() if model.nmeshtexcoord else None
        model.mesh_face[fa:fa + k] = faces[keep]
        model.mesh_facenormal[fa:fa + k] = normals
        if texcoords is not None:
            model.mesh_facetexcoord[fa:fa + k] = texcoords
        model.mesh_facenum[i] = k
        after += k
    return before, after


def auto_decimation_cell(height: int, width: int) -> float | None:
    """Grid cell for ``decimate_meshes_for_rendering`` that stays well below a pixel (None above 256 px)."""
    size = max(int(height), int(width))
    return None if size > 256 else 0.24 / size


def speed_up_model_rendering(model: mujoco.MjModel, height: int, width: int) -> None:
    """Cheap-render settings on the model; call before creating a renderer for it."""
    model.vis.quality.offsamples = 0  # no multisampling
    model.vis.quality.shadowsize = 0
    model.light_castshadow[:] = 0
    model.mat_reflectance[:] = 0
    model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), int(width))
    model.vis.global_.offheight = max(int(model.vis.global_.offheight), int(height))


def _gl_context_class(backend: str) -> Any:
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        from mujoco.osmesa import GLContext
    elif backend in ("glfw", "glx"):
        from mujoco.glfw import GLContext
    else:
        from mujoco.gl_context import GLContext
    return GLContext


_CURRENT: list[Any] = [None]  # the GL context made current last (avoid redundant make_current calls)
_LIVE: weakref.WeakSet[FastRenderer] = weakref.WeakSet()
_ATEXIT_REGISTERED = [False]


def _close_all() -> None:  # free GL contexts before interpreter teardown (else EGL errors are printed)
    for renderer in list(_LIVE):
        try:
            renderer.close()
        except Exception:  # noqa: BLE001
            pass


def _register_close_all() -> None:
    # atexit runs handlers last-in-first-out: registering after mujoco.egl/osmesa was imported (it registers
    # its display teardown then) makes our contexts go first, while the display is still alive.
    if not _ATEXIT_REGISTERED[0]:
        atexit.register(_close_all)
        _ATEXIT_REGISTERED[0] = True


class FastRenderer:
    """Offscreen renderer for one model at (height, width) with the expensive effects off.

    It edits the model in place (render settings; with ``decimate``, mesh triangles for images <= 256 px --
    see ``decimate_meshes_for_rendering``; physics is unaffected).

    ``render(data, camera)`` returns an upright uint8 [H, W, 3] array. Set ``rotate180[camera]=True`` for
    cameras mounted upside down (their image is rotated by 180 degrees, i.e. flipped in both axes).
    Call ``close()`` when done (releases the GL context; avoids noisy errors at interpreter exit).
    """

    def __init__(self, model: mujoco.MjModel, height: int, width: int, decimate: bool = True):
        self.height, self.width = int(height), int(width)
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        speed_up_model_rendering(model, self.height, self.width)
        cell = auto_decimation_cell(self.height, self.width) if decimate else None
        if cell is not None:
            decimate_meshes_for_rendering(model, cell)
        self.model = model
        self._ctx = _gl_context_class(GL_BACKEND)(self.width, self.height)
        _register_close_all()
        self._ctx.make_current()
        _CURRENT[0] = self._ctx
        self._scene = mujoco.MjvScene(model, maxgeom=max(1000, 2 * model.ngeom + 100))
        flags = self._scene.flags
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                     mujoco.mjtRndFlag.mjRND_SKYBOX, mujoco.mjtRndFlag.mjRND_FOG,
                     mujoco.mjtRndFlag.mjRND_HAZE):
            flags[flag] = 0
        self._option = mujoco.MjvOption()
        self._perturb = mujoco.MjvPerturb()
        self._camera = mujoco.MjvCamera()
        self._camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self._con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_50)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._con)
        self._rect = mujoco.MjrRect(0, 0, self.width, self.height)
        self._buf = np.empty((self.height, self.width, 3), dtype=np.uint8)
        self.rotate180: dict[str, bool] = {}
        self._cam_ids: dict[str, int] = {}
        _LIVE.add(self)

    def camera_id(self, camera: str) -> int:
        if camera not in self._cam_ids:
            cam_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
            if cam_id < 0:
                names = [mujoco.mj_id2name(self.model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(self.model.ncam)]
                raise ValueError(f"no camera named {camera!r}; the model has {names}")
            self._cam_ids[camera] = cam_id
        return self._cam_ids[camera]

    def render(self, data: mujoco.MjData, camera: str) -> np.ndarray:
        if self._con is None:
            raise RuntimeError("renderer is closed")
        if _CURRENT[0] is not self._ctx:
            self._ctx.make_current()
            _CURRENT[0] = self._ctx
        self._camera.fixedcamid = self.camera_id(camera)
        mujoco.mjv_updateScene(self.model, data, self._option, self._perturb, self._camera,
                               mujoco.mjtCatBit.mjCAT_ALL, self._scene)
        mujoco.mjr_render(self._rect, self._scene, self._con)
        mujoco.mjr_readPixels(self._buf, None, self._rect, self._con)
        # OpenGL rows run bottom-up: flip vertically for a normal image, or horizontally for a 180° turn
        img = self._buf[:, ::-1] if self.rotate180.get(camera, False) else self._buf[::-1]
        return np.ascontiguousarray(img)

    def close(self) -> None:
        con, self._con = getattr(self, "_con", None), None
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if con is not None:
            con.free()
        if ctx is not None:
            if _CURRENT[0] is ctx:
                _CURRENT[0] = None
            ctx.free()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter shutdown
            pass

    def __enter__(self) -> FastRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def camera_is_upside_down(model: mujoco.MjModel, data: mujoco.MjData, camera: str) -> bool:
    """True when the camera's image-up axis points below the horizon (world z < 0): its picture is upside down.

    A camera frame has x = image right, y = image up, -z = view direction (MuJoCo convention); needs
    ``mj_forward`` (or a step) to have filled ``data.cam_xmat``.
    """
    cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    if cam_id < 0:
        raise ValueError(f"no camera named {camera!r}")
    up = data.cam_xmat[cam_id].reshape(3, 3)[:, 1]
    return bool(up[2] < 0)
