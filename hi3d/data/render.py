"""Orbit renderer: RGBA, depth and world-space normals of a mesh at exact cameras, headless on the CPU.

Renderer: pyrender on EGL (Mesa llvmpipe without a GPU), with pyrender's 4x MSAA as antialiasing.
Every view takes three passes with one renderer kept alive across views and calls:
- albedo pass: unlit (flat) base colour = material colour x texture x vertex/face colour, faces
  rendered from both sides, material transparency ignored (surfaces are opaque);
- geometry pass: the mesh with smooth world-space normals (split at creases > 30°) as vertex
  colours; gives the coverage (alpha) and the normals;
- depth pass: the MSAA depth resolve keeps one sample, off the pixel centre (measured once per
  process, see ``_Renderer._depth_sample_offset``), so the principal point is shifted to put that
  sample on the pixel centres: depth is the camera z of the surface under each pixel centre.
Colours are resolved from MSAA as premultiplied values and divided by the coverage, so RGB is
straight alpha and exact on the object. Shading (``RenderConfig.shading``): ``lambert`` multiplies
the albedo by ``ambient + (1 - ambient) * max(0, n . l)`` for a light fixed in the world (above, in
front), so views stay consistent and untextured objects show their shape; ``flat`` keeps the albedo.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import trimesh

from hi3d import cameras
from hi3d.data.mesh_io import load_mesh
from hi3d.data.orbit import Orbit, save_orbit
from hi3d.errors import Hi3DError

EGL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri"
LIGHT_DIR = np.array([0.3, -0.5, 1.0]) / np.linalg.norm([0.3, -0.5, 1.0])  # world, towards the light
CREASE_DEG = 30.0


@dataclasses.dataclass
class RenderConfig:
    """``hi3d render-orbit``: orbit of ``num_views`` cameras evenly spaced in azimuth at one elevation."""

    num_views: int = 16
    elevation: float = 20.0  # degrees; the CLI's "--elevation random" draws uniform [elevation_min, elevation_max]
    random_elevation: bool = False
    elevation_min: float = -10.0
    elevation_max: float = 40.0
    azimuth_offset: float = 0.0  # degrees, azimuth of view 0
    resolution: int = 512  # square images, pixels
    radius: float = cameras.DEFAULT_RADIUS
    fov: float = cameras.DEFAULT_FOV_DEG  # vertical field of view, degrees
    seed: int = 0
    shading: str = "lambert"  # "lambert" | "flat"
    ambient: float = 0.5  # lambert: share of the light that does not depend on the normal
    normals: bool = True  # write normal/000.png
    depth: bool = True  # write depth/000.npy
    contact_sheet: bool = True


def sample_elevation(seed: int, low: float = -10.0, high: float = 40.0) -> float:
    """Elevation in degrees, uniform in [low, high], a pure function of ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return float(low + (high - low) * torch.rand((), generator=g, dtype=torch.float64))


def resolve_elevation(cfg: RenderConfig) -> float:
    return sample_elevation(cfg.seed, cfg.elevation_min, cfg.elevation_max) if cfg.random_elevation else cfg.elevation


# --------------------------------------------------------------------------------------------------
# pyrender glue
# --------------------------------------------------------------------------------------------------

def _pyrender():
    """Import pyrender on EGL (headless) unless the user chose another PyOpenGL platform."""
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    # Mesa's llvmpipe and triton (imported later by torch._dynamo, e.g. through diffusers) each carry their
    # own LLVM; triton segfaults when it loads after Mesa's, so load it first.
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    try:
        import pyrender
    except Exception as e:  # ImportError, or OpenGL failing to find libEGL
        raise Hi3DError(f"cannot load the headless renderer (pyrender on PYOPENGL_PLATFORM="
                        f"{os.environ['PYOPENGL_PLATFORM']}): {type(e).__name__}: {e}; "
                        f"install EGL/Mesa with: apt-get install {EGL_PACKAGES}") from None
    return pyrender


class _Renderer:
    """One pyrender OffscreenRenderer for the process, resized on demand (EGL contexts are costly)."""

    _instance = None

    def __init__(self, width: int, height: int):
        from hi3d.threads import free_cpus

        os.environ.setdefault("LP_NUM_THREADS", str(free_cpus()))  # llvmpipe's pool, fixed for the process
        pyrender = _pyrender()
        try:
            self.r = pyrender.OffscreenRenderer(width, height)
        except Exception as e:
            raise Hi3DError(f"cannot create an EGL rendering context ({type(e).__name__}: {e}); "
                            f"install EGL/Mesa with: apt-get install {EGL_PACKAGES}") from None

        self.depth_offset = self._depth_sample_offset(pyrender)

    @classmethod
    def get(cls, width: int, height: int) -> _Renderer:
        if cls._instance is None:
            cls._instance = cls(width, height)
        r = cls._instance.r
        if (r.viewport_width, r.viewport_height) != (width, height):
            r.viewport_width, r.viewport_height = width, height
        return cls._instance

    def _depth_sample_offset(self, pyrender) -> np.ndarray:
        """Where in a pixel the MSAA depth resolve samples, ``(du, dv)`` from the pixel centre in pixels.

        Renders planes tilted along x and along y (camera = world, OpenCV axes), where the depth at each
        pixel tells the image coordinate it was sampled at; Mesa's llvmpipe gives (-0.125, +0.375).
        """
        W, H = self.r.viewport_width, self.r.viewport_height
        K = cameras.intrinsics(W, H, 60.0).numpy()
        uv = cameras.pixel_centers(W, H, torch.float64).numpy()
        offset = np.zeros(2)
        for axis in (0, 1):
            s, t = np.meshgrid([-1.9, 1.9], [-8.0, 8.0], indexing="ij")
            a, b = (s, t) if axis == 0 else (t, s)  # tilt along the camera x (or y) axis: z = 2 + a_axis / 2
            verts = np.stack([a.ravel(), b.ravel(), 2 + 0.5 * (s.ravel())], -1)
            both_sides = np.array([[0, 1, 2], [1, 3, 2], [0, 2, 1], [1, 2, 3]])  # DEPTH_ONLY culls back faces
            scene = pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 0.0])
            scene.add(pyrender.Mesh([pyrender.Primitive(positions=verts.astype(np.float32), indices=both_sides)]))
            scene.add(pyrender.IntrinsicsCamera(K[0, 0], K[1, 1], K[0, 2], K[1, 2], znear=0.5, zfar=5.0),
                      pose=cameras.CV_TO_GL.numpy())
            z = self.r.render(scene, flags=pyrender.RenderFlags.DEPTH_ONLY | pyrender.RenderFlags.SKIP_CULL_FACES)
            ok = z > 0
            # plane z = 2 + x/2 with x = (u - cx) z / f  ->  u = cx + 2 f (1 - 2 / z)
            sampled = K[axis, 2] + 2 * K[axis, axis] * (1 - 2 / z[ok])
            offset[axis] = float(np.median(sampled - uv[..., axis][ok])) if ok.any() else 0.0
        return offset


def _geometries(scene: trimesh.Scene | trimesh.Trimesh) -> list[trimesh.Trimesh]:
    """All triangle meshes of ``scene`` with their scene-graph transforms applied (world coordinates)."""
    if isinstance(scene, trimesh.Trimesh):
        return [scene]
    meshes = scene.dump(concatenate=False)
    return [m for m in meshes if isinstance(m, trimesh.Trimesh) and len(m.faces)]


def _albedo_mesh(pyrender, m: trimesh.Trimesh):
    """pyrender mesh with the asset's own colours/textures, opaque."""
    material = None
    if not m.visual.defined:
        material = pyrender.MetallicRoughnessMaterial(baseColorFactor=[0.8, 0.8, 0.8, 1.0])
    mesh = pyrender.Mesh.from_trimesh(m, material=material, smooth=m.visual.kind != "face")
    for p in mesh.primitives:
        p.material.alphaMode = "OPAQUE"
    return mesh


def _normal_mesh(pyrender, m: trimesh.Trimesh):
    """pyrender mesh whose vertex colours are ``(n + 1) / 2`` of smooth world normals (split at creases)."""
    bare = trimesh.Trimesh(m.vertices, m.faces, process=False)  # geometry only: no texture copies
    smooth = trimesh.graph.smooth_shade(bare, angle=math.radians(CREASE_DEG)) if len(m.faces) > 1 else bare
    n = np.asarray(smooth.vertex_normals, dtype=np.float64)
    colors = np.concatenate([(n + 1) / 2, np.ones((len(n), 1))], axis=1).astype(np.float32)
    material = pyrender.MetallicRoughnessMaterial(baseColorFactor=[1.0, 1.0, 1.0, 1.0], alphaMode="OPAQUE")
    prim = pyrender.Primitive(positions=smooth.vertices.astype(np.float32), indices=smooth.faces,
                              color_0=colors, material=material)
    return pyrender.Mesh(primitives=[prim])


def _clip_planes(c2w: np.ndarray, center: np.ndarray, extent: float) -> tuple[float, float]:
    """znear/zfar bracketing the bounding sphere (``center``, radius ``extent``) seen from ``c2w``."""
    z = float((center - c2w[:3, 3]) @ c2w[:3, 2])
    return max(z - extent * 1.05, 1e-3 * max(extent, 1e-6), 1e-4), max(z + extent * 1.05, 1e-2)


def render_views(scene_or_path: str | Path | trimesh.Scene | trimesh.Trimesh, c2w: torch.Tensor,
                 K: torch.Tensor, width: int, height: int, normalization=None, shading: str = "lambert",
                 ambient: float = 0.5, with_depth: bool = True) -> Orbit:
    """Render views of a mesh at arbitrary cameras.

    ``scene_or_path``: a mesh file (read by ``mesh_io.load_mesh``: +Z up, unit cube) or a world-space
    ``trimesh.Scene``/``Trimesh`` (then ``normalization`` is recorded as given, identity by default).
    ``c2w [N, 4, 4]`` OpenCV camera-to-world; ``K [N, 3, 3]`` or ``[3, 3]`` in pixels for ``width x height``.
    Returns an ``Orbit``: rgba ``[N, H, W, 4]`` straight alpha = pixel coverage (RGB white where alpha
    is 0), depth ``[N, H, W]`` camera z in world units of the surface under the pixel centre (0 where the
    centre ray misses it, so a few silhouette pixels with alpha >= 0.5 may have 0; None without
    ``with_depth``, which saves a third of the time), normal ``[N, H, W, 3]`` unit world-space normals
    (0 off the object), azimuth/elevation/radius of the camera centres.
    """
    if shading not in ("lambert", "flat"):
        raise Hi3DError(f"unknown shading '{shading}' (choose lambert or flat)")
    if isinstance(scene_or_path, (str, Path)):
        scene, norm = load_mesh(scene_or_path)
        source = str(scene_or_path)
    else:
        scene, norm, source = scene_or_path, (np.eye(4) if normalization is None else normalization), None
    c2w = torch.as_tensor(c2w, dtype=torch.float64).reshape(-1, 4, 4)
    K = torch.as_tensor(K, dtype=torch.float64)
    K = K.expand(len(c2w), 3, 3) if K.ndim == 2 else K
    if len(K) != len(c2w):
        raise Hi3DError(f"render_views: {len(c2w)} cameras but {len(K)} intrinsics")
    geoms = _geometries(scene)
    if not geoms:
        raise Hi3DError("render_views: the scene has no triangle faces")

    pyrender = _pyrender()
    renderer = _Renderer.get(width, height)
    pr_scene = pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 0.0], ambient_light=[1.0, 1.0, 1.0])
    albedo = [pr_scene.add(_albedo_mesh(pyrender, m)) for m in geoms]
    normal = [pr_scene.add(_normal_mesh(pyrender, m)) for m in geoms]
    lo = np.min([m.bounds[0] for m in geoms], axis=0)
    hi = np.max([m.bounds[1] for m in geoms], axis=0)
    center, extent = (lo + hi) / 2, float(np.linalg.norm(hi - lo) / 2)
    cam = pyrender.IntrinsicsCamera(fx=1.0, fy=1.0, cx=0.0, cy=0.0)
    cam_node = pr_scene.add(cam, pose=np.eye(4))
    flags = pyrender.RenderFlags.RGBA | pyrender.RenderFlags.FLAT | pyrender.RenderFlags.SKIP_CULL_FACES

    def show(albedo_pass: bool) -> None:
        for node_a, node_n in zip(albedo, normal):
            node_a.mesh.is_visible, node_n.mesh.is_visible = albedo_pass, not albedo_pass

    N = len(c2w)
    rgba, normals = np.empty((N, height, width, 4), np.float32), np.empty((N, height, width, 3), np.float32)
    depth = np.empty((N, height, width), np.float32) if with_depth else None
    for i in range(N):
        Ki, pose = K[i].numpy(), c2w[i].numpy()
        cam.fx, cam.fy, cam.cx, cam.cy = Ki[0, 0], Ki[1, 1], Ki[0, 2], Ki[1, 2]
        cam.znear, cam.zfar = _clip_planes(pose, center, extent)
        pr_scene.set_pose(cam_node, cameras.opencv_to_opengl(c2w[i]).numpy())
        show(albedo_pass=True)
        col, _ = renderer.r.render(pr_scene, flags=flags)
        show(albedo_pass=False)
        geo, _ = renderer.r.render(pr_scene, flags=flags)
        if with_depth:  # the MSAA resolve samples depth off-centre: shift the principal point onto pixel centres
            cam.cx, cam.cy = Ki[0, 2] + renderer.depth_offset[0], Ki[1, 2] + renderer.depth_offset[1]
            _, depth[i] = renderer.r.render(pr_scene, flags=flags)
        rgba[i], normals[i] = _resolve(col, geo, shading, ambient)
    pr_scene.clear()  # frees the GPU buffers on the next render
    az, el, r = cameras.azimuth_elevation_radius(c2w)
    return Orbit(rgba=torch.from_numpy(rgba), c2w=c2w.clone(), K=K.clone(), azimuth_deg=az, elevation_deg=el,
                 radius=r, normalization=torch.as_tensor(np.asarray(norm), dtype=torch.float64),
                 depth=None if depth is None else torch.from_numpy(depth), normal=torch.from_numpy(normals),
                 source=["render"] * N, meta={"mesh": source} if source else {})


def render_depth(scene: trimesh.Scene | trimesh.Trimesh, c2w: torch.Tensor, K: torch.Tensor, width: int,
                 height: int) -> torch.Tensor:
    """Depth only (one pass a view, faces from both sides): ``[N, H, W]`` float32 camera z of the surface under
    each pixel centre, 0 where the centre ray misses it. ``scene`` in world coordinates; cameras as ``render_views``."""
    c2w = torch.as_tensor(c2w, dtype=torch.float64).reshape(-1, 4, 4)
    K = torch.as_tensor(K, dtype=torch.float64)
    K = K.expand(len(c2w), 3, 3) if K.ndim == 2 else K
    geoms = _geometries(scene)
    if not geoms:
        raise Hi3DError("render_depth: the scene has no triangle faces")
    pyrender = _pyrender()
    renderer = _Renderer.get(width, height)
    pr_scene = pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 0.0])
    for m in geoms:  # both windings: the depth-only pass culls back faces whatever the flags say
        faces = np.concatenate([m.faces, m.faces[:, ::-1]])
        pr_scene.add(pyrender.Mesh([pyrender.Primitive(positions=m.vertices.astype(np.float32), indices=faces)]))
    lo = np.min([m.bounds[0] for m in geoms], axis=0)
    hi = np.max([m.bounds[1] for m in geoms], axis=0)
    center, extent = (lo + hi) / 2, float(np.linalg.norm(hi - lo) / 2)
    cam = pyrender.IntrinsicsCamera(fx=1.0, fy=1.0, cx=0.0, cy=0.0)
    cam_node = pr_scene.add(cam, pose=np.eye(4))
    flags = pyrender.RenderFlags.DEPTH_ONLY | pyrender.RenderFlags.SKIP_CULL_FACES
    depth = np.empty((len(c2w), height, width), np.float32)
    for i in range(len(c2w)):
        Ki = K[i].numpy()
        cam.fx, cam.fy = Ki[0, 0], Ki[1, 1]
        cam.cx, cam.cy = Ki[0, 2] + renderer.depth_offset[0], Ki[1, 2] + renderer.depth_offset[1]
        cam.znear, cam.zfar = _clip_planes(c2w[i].numpy(), center, extent)
        pr_scene.set_pose(cam_node, cameras.opencv_to_opengl(c2w[i]).numpy())
        depth[i] = renderer.r.render(pr_scene, flags=flags)
    pr_scene.clear()
    return torch.from_numpy(depth)


def _resolve(col: np.ndarray, geo: np.ndarray, shading: str, ambient: float) -> tuple[np.ndarray, np.ndarray]:
    """MSAA-resolved uint8 passes ``[H, W, 4]`` -> (rgba ``[H, W, 4]``, unit normal ``[H, W, 3]``) float32."""
    alpha = geo[..., 3:].astype(np.float32) / 255.0
    covered = alpha > 0
    inv = np.where(covered, 1.0 / np.maximum(alpha, 1e-6), 0.0).astype(np.float32) / 255.0
    n = geo[..., :3] * (2 * inv) - covered
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)
    rgb = np.minimum(col[..., :3] * inv, 1.0)
    if shading == "lambert":
        rgb *= ambient + (1 - ambient) * np.maximum(n @ LIGHT_DIR.astype(np.float32), 0)[..., None]
    rgb[~covered[..., 0]] = 1.0
    return np.concatenate([rgb, alpha], -1), n


def render_orbit(mesh_path: str | Path | trimesh.Scene, cfg: RenderConfig, normalization=None) -> Orbit:
    """The orbit of ``cfg`` around the mesh file at ``mesh_path`` (normalised into the unit cube), or
    around an already-normalised world-space scene (``normalization`` recorded as given)."""
    elevation = resolve_elevation(cfg)
    c2w, az, el = cameras.orbit_poses(cfg.num_views, elevation, cfg.radius, cfg.azimuth_offset)
    K = cameras.intrinsics(cfg.resolution, cfg.resolution, cfg.fov)
    orbit = render_views(mesh_path, c2w, K, cfg.resolution, cfg.resolution, normalization=normalization,
                         shading=cfg.shading, ambient=cfg.ambient, with_depth=cfg.depth)
    orbit.azimuth_deg, orbit.elevation_deg = az, el
    orbit.radius = torch.full((cfg.num_views,), float(cfg.radius), dtype=torch.float64)
    orbit.meta.update(renderer="pyrender-egl", shading=cfg.shading, ambient=cfg.ambient, fov_deg=cfg.fov)
    if not cfg.normals:
        orbit.normal = None
    return orbit


# --------------------------------------------------------------------------------------------------
# hi3d render-orbit
# --------------------------------------------------------------------------------------------------

def cli(argv: list[str]) -> int:
    import argparse

    from hi3d.cli import add_config_args
    from hi3d.config import load_config, to_yaml
    from hi3d.io import write_bytes
    from hi3d.provenance import RunRecord

    p = argparse.ArgumentParser(prog="hi3d render-orbit", description="render orbit views of a mesh")
    p.add_argument("mesh", help="mesh file (obj, glb, gltf, ply, stl, off, dae)")
    p.add_argument("--out", required=True, help="output orbit folder")
    p.add_argument("--num-views", type=int)
    p.add_argument("--elevation", help="degrees, or 'random' for uniform [-10, 40] drawn from --seed")
    p.add_argument("--azimuth-offset", type=float)
    p.add_argument("--resolution", type=int)
    p.add_argument("--radius", type=float)
    p.add_argument("--fov", type=float)
    p.add_argument("--seed", type=int)
    add_config_args(p)
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    for flag, key in [("num_views", "num_views"), ("azimuth_offset", "azimuth_offset"), ("resolution", "resolution"),
                      ("radius", "radius"), ("fov", "fov"), ("seed", "seed")]:
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.elevation is not None:
        if args.elevation.strip().lower() == "random":
            overrides.append("random_elevation=true")
        else:
            try:
                overrides += [f"elevation={float(args.elevation)}", "random_elevation=false"]
            except ValueError:
                raise Hi3DError(f"--elevation must be degrees or 'random', got '{args.elevation}'") from None
    cfg = load_config(RenderConfig, args.config, overrides)
    if cfg.num_views < 1 or cfg.resolution < 1 or cfg.radius <= 0 or not 0 < cfg.fov < 180:
        raise Hi3DError("render-orbit: need num_views >= 1, resolution >= 1, radius > 0 and 0 < fov < 180")
    scene, normalization = load_mesh(args.mesh)  # bad files fail here, before anything is written
    _Renderer.get(cfg.resolution, cfg.resolution)  # so does a missing EGL
    out = Path(args.out)
    rec = RunRecord(out, "render-orbit", config=cfg, seed=cfg.seed)
    write_bytes(out / "config.yaml", to_yaml(cfg).encode())
    with rec.stage("render") as entry:
        orbit = render_orbit(scene, cfg, normalization)
        orbit.meta["mesh"] = str(args.mesh)
        entry["views"] = len(orbit)
    with rec.stage("save"):
        save_orbit(orbit, out, sheet=cfg.contact_sheet)
    rec.finish(elevation_deg=float(orbit.elevation_deg[0]), mesh=str(args.mesh))
    print(f"wrote {len(orbit)} views ({cfg.resolution}x{cfg.resolution}, elevation "
          f"{float(orbit.elevation_deg[0]):.2f} deg) to {out}", file=sys.stderr)
    return 0
