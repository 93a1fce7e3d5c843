"""The one camera convention of hi3d, defined here and used everywhere.

World: right-handed, +Z up, objects normalised to fit the unit cube [-0.5, 0.5]^3 at the origin.
Cameras: camera-to-world matrices (c2w, ``[..., 4, 4]``) in the OpenCV convention: camera x right,
y down, z forward (looking along +z). Pixel (row i, column j) has its centre at (u, v) = (j + 0.5, i + 0.5).
Depth is the camera-space z (distance along the optical axis), in world units.
Orbits: azimuth 0 looks at the object from the input view (camera on the -Y axis, looking at +Y,
i.e. at the front of a glTF asset), azimuth increases counter-clockwise seen from above; elevation
positive puts the camera above the object. Angles are in degrees unless a name says ``_rad``.
Defaults: radius 1.5, vertical field of view 49.1°.
"""

from __future__ import annotations

import math

import torch

CONVENTION = "hi3d-opencv-zup"
DEFAULT_RADIUS = 1.5
DEFAULT_FOV_DEG = 49.1

# Axis change from a +Y-up file (glTF, and by custom OBJ/PLY) into the +Z-up world: (x, y, z) -> (x, -z, y).
# glTF's front (+Z) becomes -Y, which the azimuth-0 camera sees.
YUP_TO_ZUP = torch.tensor(
    [[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64
)
ZUP_TO_YUP = YUP_TO_ZUP.T.clone()
# OpenCV camera axes <-> OpenGL/Blender camera axes (x right, y up, z backward).
CV_TO_GL = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))


def camera_position(azimuth_deg, elevation_deg, radius=DEFAULT_RADIUS) -> torch.Tensor:
    """Camera centre on the orbit sphere: ``[..., 3]`` (float64) from broadcastable angles in degrees."""
    az = torch.deg2rad(torch.as_tensor(azimuth_deg, dtype=torch.float64))
    el = torch.deg2rad(torch.as_tensor(elevation_deg, dtype=torch.float64))
    r = torch.as_tensor(radius, dtype=torch.float64)
    az, el, r = torch.broadcast_tensors(az, el, r)
    return torch.stack([r * el.cos() * az.sin(), -r * el.cos() * az.cos(), r * el.sin()], dim=-1)


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None, up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """OpenCV c2w ``[..., 4, 4]`` of cameras at ``eye [..., 3]`` looking at ``target`` (origin by default).

    Raises ``ValueError`` when the viewing direction is parallel to ``up`` (elevation ±90°).
    """
    eye = torch.as_tensor(eye, dtype=torch.float64)
    target = torch.zeros_like(eye) if target is None else torch.as_tensor(target, dtype=eye.dtype).expand_as(eye)
    up_t = torch.as_tensor(up, dtype=eye.dtype).expand_as(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    right = torch.linalg.cross(forward, up_t)
    if (right.norm(dim=-1) < 1e-9).any():
        raise ValueError("look_at: viewing direction is parallel to the up vector (elevation ±90°)")
    right = torch.nn.functional.normalize(right, dim=-1)
    down = torch.linalg.cross(forward, right)
    c2w = torch.zeros(eye.shape[:-1] + (4, 4), dtype=eye.dtype)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = right, down, forward, eye
    c2w[..., 3, 3] = 1.0
    return c2w


def orbit_azimuths(num_views: int, azimuth_offset_deg: float = 0.0) -> torch.Tensor:
    """Evenly spaced azimuths ``[num_views]`` in degrees, view 0 at the offset."""
    return azimuth_offset_deg + 360.0 * torch.arange(num_views, dtype=torch.float64) / num_views


def orbit_c2w(azimuth_deg, elevation_deg, radius=DEFAULT_RADIUS) -> torch.Tensor:
    """c2w ``[..., 4, 4]`` of cameras on the orbit looking at the origin."""
    return look_at(camera_position(azimuth_deg, elevation_deg, radius))


def orbit_poses(num_views: int = 16, elevation_deg=20.0, radius: float = DEFAULT_RADIUS,
                azimuth_offset_deg: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An orbit: ``(c2w [N, 4, 4], azimuth_deg [N], elevation_deg [N])``; elevation may be per view."""
    az = orbit_azimuths(num_views, azimuth_offset_deg)
    el = torch.as_tensor(elevation_deg, dtype=torch.float64).expand(num_views).clone()
    return orbit_c2w(az, el, radius), az, el


def focal_from_fov(fov_deg: float, size: int) -> float:
    """Focal length in pixels for a field of view ``fov_deg`` spanning ``size`` pixels."""
    return 0.5 * size / math.tan(math.radians(fov_deg) / 2)


def intrinsics(width: int, height: int | None = None, fov_deg: float = DEFAULT_FOV_DEG) -> torch.Tensor:
    """Pinhole K ``[3, 3]`` (float64) with vertical FOV ``fov_deg``, square pixels, centred principal point."""
    height = width if height is None else height
    f = focal_from_fov(fov_deg, height)
    return torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=torch.float64)


def scale_intrinsics(K: torch.Tensor, sx: float, sy: float | None = None) -> torch.Tensor:
    """K for the same camera with the image resized by ``sx`` (and ``sy``) times."""
    sy = sx if sy is None else sy
    return torch.diag(torch.tensor([sx, sy, 1.0], dtype=K.dtype)) @ K


def world_to_camera(points: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
    """Points ``[..., 3]`` from world to camera coordinates of ``c2w [4, 4]``."""
    R, t = c2w[:3, :3].to(points.dtype), c2w[:3, 3].to(points.dtype)
    return (points - t) @ R


def project(points: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World points ``[..., 3]`` -> pixel coordinates ``uv [..., 2]`` (x right, y down) and depth ``[...]``."""
    cam = world_to_camera(points, c2w)
    z = cam[..., 2]
    uv = cam[..., :2] / z[..., None] * K[[0, 1], [0, 1]].to(points.dtype) + K[:2, 2].to(points.dtype)
    return uv, z


def unproject(uv: torch.Tensor, depth: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Pixel coordinates ``uv [..., 2]`` with camera-z ``depth [...]`` -> world points ``[..., 3]``."""
    dt = uv.dtype
    xy = (uv - K[:2, 2].to(dt)) / K[[0, 1], [0, 1]].to(dt) * depth[..., None]
    cam = torch.cat([xy, depth[..., None]], dim=-1)
    return cam @ c2w[:3, :3].to(dt).T + c2w[:3, 3].to(dt)


def pixel_centers(width: int, height: int, dtype=torch.float32) -> torch.Tensor:
    """``uv [H, W, 2]`` of pixel centres."""
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype) + 0.5, torch.arange(width, dtype=dtype) + 0.5, indexing="ij")
    return torch.stack([u, v], dim=-1)


def get_rays(c2w: torch.Tensor, K: torch.Tensor, width: int, height: int,
             dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel centres: ``origins [H, W, 3]``, unit ``directions [H, W, 3]``.

    A point at camera-z depth ``d`` along pixel ``p`` is ``o + dirs * d / (dirs · forward)``.
    """
    uv = pixel_centers(width, height, dtype)
    points = unproject(uv, torch.ones(height, width, dtype=dtype), c2w, K)
    origins = c2w[:3, 3].to(dtype).expand(height, width, 3)
    return origins, torch.nn.functional.normalize(points - origins, dim=-1)


def interpolated_views(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, radius: torch.Tensor | float,
                       num_interp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_interp`` cameras spread evenly over the gaps between adjacent orbit views.

    The N views are taken in order around the orbit (gap i joins view i and view (i+1) % N). Gap i
    gets ``floor((i+1)M/N) - floor(iM/N)`` views at fractions ``k/(n_i+1)`` of the way along it, with
    azimuth (forward, counter-clockwise, as the orbit goes), elevation and radius interpolated linearly, so every camera lies
    on the orbit and looks at the origin, never through the object. M = N gives one view half-way
    along each gap. Returns ``(azimuth_deg [M], elevation_deg [M], radius [M])`` in float64.
    """
    az = torch.as_tensor(azimuth_deg, dtype=torch.float64)
    el = torch.as_tensor(elevation_deg, dtype=torch.float64)
    n = az.numel()
    r = torch.as_tensor(radius, dtype=torch.float64).expand(n)
    out_az, out_el, out_r = [], [], []
    for i in range(n):
        count = (i + 1) * num_interp // n - i * num_interp // n
        j = (i + 1) % n
        delta = (az[j] - az[i]) % 360.0
        for k in range(1, count + 1):
            t = k / (count + 1)
            out_az.append((az[i] + t * delta) % 360.0)
            out_el.append(el[i] + t * (el[j] - el[i]))
            out_r.append(r[i] + t * (r[j] - r[i]))
    if not out_az:
        empty = torch.zeros(0, dtype=torch.float64)
        return empty, empty.clone(), empty.clone()
    return torch.stack(out_az), torch.stack(out_el), torch.stack(out_r)


def azimuth_elevation_radius(c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``camera_position`` for camera centres of ``c2w [..., 4, 4]`` (degrees, azimuth in [0, 360))."""
    p = c2w[..., :3, 3].to(torch.float64)
    r = p.norm(dim=-1)
    el = torch.rad2deg(torch.asin((p[..., 2] / r).clamp(-1, 1)))
    az = torch.rad2deg(torch.atan2(p[..., 0], -p[..., 1])) % 360.0
    return az, el, r


def opencv_to_opengl(c2w: torch.Tensor) -> torch.Tensor:
    """OpenCV c2w -> OpenGL/Blender camera axes (same world); the map is its own inverse."""
    return c2w @ CV_TO_GL.to(c2w.dtype)


opengl_to_opencv = opencv_to_opengl


def to_viewmat(c2w: torch.Tensor) -> torch.Tensor:
    """gsplat ``viewmats``: world-to-camera ``[..., 4, 4]`` in the OpenCV convention."""
    return torch.linalg.inv(c2w)


def from_viewmat(viewmat: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(viewmat)


def c2w_world_zup_to_yup(c2w: torch.Tensor) -> torch.Tensor:
    """Express a c2w of our +Z-up world in a +Y-up world (glTF), camera axes unchanged."""
    return ZUP_TO_YUP.to(c2w.dtype) @ c2w


def c2w_world_yup_to_zup(c2w: torch.Tensor) -> torch.Tensor:
    return YUP_TO_ZUP.to(c2w.dtype) @ c2w
