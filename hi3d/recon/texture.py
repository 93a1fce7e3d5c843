"""UV texture baking of a world-space mesh from posed RGBA views.

1. ``uv_unwrap``: xatlas charts and packs the mesh (vertices are split along chart seams).
2. ``texel_samples``: the atlas is rasterised in UV space (plain-torch barycentric rasteriser,
   ``rasterize_triangles``) to get each covered texel's 3D point and interpolated vertex normal.
3. ``view_colors``: every texel is projected into every view (``hi3d.cameras.project``); it takes the
   view's colour where it is visible (camera z within ``depth_tolerance`` of a z-buffer of the mesh,
   ``depth_map``, rendered with the same rasteriser) and inside the view's alpha mask, weighted by
   ``cos(normal, direction to the camera) ** cos_power``.
4. Texels no view sees take ``fallback(points, normals)`` (the NeuS colour network in reconstruction);
   the atlas is then dilated ``dilate`` texels past chart borders so bilinear/mipmap lookups do not
   bleed background into the seams, and the remaining empty texels get the mean colour.

Texture images follow the OBJ/glTF-in-trimesh convention: UV origin at the bottom-left, image row 0 is
v = 1; texel (row i, column j) has its centre at uv = ((j + 0.5) / S, 1 - (i + 0.5) / S).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image

from hi3d import cameras
from hi3d.data.orbit import Orbit
from hi3d.errors import Hi3DError

ColorFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (points [N, 3], normals [N, 3]) -> rgb [N, 3]


# --------------------------------------------------------------------------------------------- rasteriser

def rasterize_triangles(tri: torch.Tensor, width: int, height: int,
                        max_pairs: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (pixel, triangle) pair whose pixel centre lies inside (or on the edge of) the triangle.

    ``tri [F, 3, 2]`` vertex positions in pixel units (x right, y down; pixel (i, j) has its centre at
    (j + 0.5, i + 0.5)). Returns ``pixel [K]`` (flat index ``i * width + j``), ``face [K]`` and
    barycentric coordinates ``bary [K, 3]`` (float64) of the pixel centre. Degenerate triangles cover
    nothing. Work is chunked over faces to about ``max_pairs`` candidate pixels (bounding boxes) at a time.
    """
    tri = tri.to(torch.float64)
    lo = torch.ceil(tri.amin(1) - 0.5).clamp_min(0).long()
    hi = torch.floor(tri.amax(1) - 0.5).long()
    hi = torch.minimum(hi, torch.tensor([width - 1, height - 1]))
    span = (hi - lo + 1).clamp_min(0)
    a, b, c = tri.unbind(1)
    area = _cross(b - a, c - a)
    count = torch.where(area.abs() > 1e-12, span[:, 0] * span[:, 1], 0)
    ends = count.cumsum(0)
    pixels, faces, barys = [], [], []
    start = 0
    while start < len(tri):
        base = int(ends[start - 1]) if start else 0
        stop = max(int(torch.searchsorted(ends, base + max_pairs, right=True)), start + 1)
        cnt = count[start:stop]
        f = torch.repeat_interleave(torch.arange(start, stop), cnt)
        if len(f):
            local = torch.arange(len(f)) - (ends[start:stop] - cnt - base).repeat_interleave(cnt)
            nx = span[f, 0]
            x, y = lo[f, 0] + local % nx, lo[f, 1] + local // nx
            p = torch.stack([x, y], -1).to(torch.float64) + 0.5
            w0 = _cross(c[f] - b[f], p - b[f]) / area[f]
            w1 = _cross(a[f] - c[f], p - c[f]) / area[f]
            bary = torch.stack([w0, w1, 1 - w0 - w1], -1)
            inside = (bary >= -1e-9).all(-1)
            pixels.append((y * width + x)[inside])
            faces.append(f[inside])
            barys.append(bary[inside])
        start = stop
    if not pixels:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.float64)
    return torch.cat(pixels), torch.cat(faces), torch.cat(barys)


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def depth_map(vertices: torch.Tensor, faces: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor,
              width: int, height: int) -> torch.Tensor:
    """Z-buffer ``[H, W]`` (float64): camera z of the nearest surface under each pixel centre, inf where none.

    ``vertices [V, 3]`` world, ``faces [F, 3]``; faces reaching behind the camera are skipped."""
    uv, z = cameras.project(vertices.to(torch.float64), c2w, K)
    front = (z[faces] > 1e-6).all(1)
    fc = faces[front]
    pix, f, bary = rasterize_triangles(uv[fc], width, height)
    depth = 1.0 / (bary / z[fc[f]]).sum(1)  # perspective-correct: 1/z is linear in screen space
    out = torch.full((height * width,), float("inf"), dtype=torch.float64)
    return out.scatter_reduce(0, pix, depth, "amin").view(height, width)


# ------------------------------------------------------------------------------------------------- atlas

def uv_unwrap(mesh: trimesh.Trimesh, size: int = 1024, padding: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas parametrisation: ``(vmap [V'] int64 index into mesh.vertices, faces [F, 3] into the split
    vertices, uv [V', 2] float64 in [0, 1])``, charts packed for a ``size``² atlas with ``padding`` texels."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(mesh.vertices, np.float32), np.ascontiguousarray(mesh.faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding, pack.bilinear = size, padding, True
    atlas.generate(pack_options=pack)
    if atlas.atlas_count > 1:  # the estimated scale overflowed one page: pack into a single atlas instead
        pack.resolution, pack.texels_per_unit = 0, atlas.texels_per_unit
        atlas.generate(pack_options=pack)
    vmap, faces, uv = atlas[0]
    return vmap.astype(np.int64), faces.astype(np.int64), uv.astype(np.float64)


def texel_samples(uv: torch.Tensor, faces: torch.Tensor, vertices: torch.Tensor, normals: torch.Tensor,
                  size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Texels of a ``size``² atlas covered by the UV triangles: ``texel [T]`` (flat index row * size + col),
    their 3D ``points [T, 3]`` and unit ``normals [T, 3]`` (barycentric interpolation, float64).

    ``uv [V, 2]`` in [0, 1] (v up), ``faces [F, 3]``, ``vertices [V, 3]``, ``normals [V, 3]``."""
    tex = torch.stack([uv[:, 0] * size, (1 - uv[:, 1]) * size], -1)
    pix, f, bary = rasterize_triangles(tex[faces], size, size)
    owner = torch.full((size * size,), -1, dtype=torch.long).scatter_reduce(0, pix, torch.arange(len(pix)), "amax")
    k = owner[owner >= 0]  # one triangle per texel (texels on a shared edge: the later face)
    fv, b = faces[f[k]], bary[k, :, None]
    points = (vertices.to(torch.float64)[fv] * b).sum(1)
    n = F.normalize((normals.to(torch.float64)[fv] * b).sum(1), dim=-1)
    return pix[k], points, n


# --------------------------------------------------------------------------------------------- colouring

def _sample(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``[N, C]`` of ``image [H, W, C]`` at pixel coordinates ``uv [N, 2]`` (border clamp)."""
    H, W = image.shape[:2]
    grid = torch.stack([uv[:, 0] / W * 2 - 1, uv[:, 1] / H * 2 - 1], -1).to(image.dtype)
    out = F.grid_sample(image.permute(2, 0, 1)[None], grid[None, None], align_corners=False, padding_mode="border")
    return out[0, :, 0].T


def _zbuffer_at(zbuf: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Depth of the z-buffer ``[H, W]`` at ``uv [N, 2]``: bilinear where the 4 neighbouring pixel centres all
    hit the surface, else the nearest of those that do (inf if none)."""
    H, W = zbuf.shape
    x, y = uv[:, 0] - 0.5, uv[:, 1] - 0.5
    x0, y0 = x.floor().long(), y.floor().long()
    fx, fy = x - x0, y - y0
    total, wsum, near = 0.0, 0.0, torch.full_like(x, float("inf"))
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = (x0 + dx).clamp(0, W - 1), (y0 + dy).clamp(0, H - 1)
        d = zbuf[yi, xi]
        w = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        total = total + w * torch.where(d.isfinite(), d, 0.0)
        wsum = wsum + w * d.isfinite()
        near = torch.minimum(near, d)
    all_hit = (wsum > 1 - 1e-9)
    return torch.where(all_hit, total / wsum.clamp_min(1e-12), near)


def view_colors(points: torch.Tensor, normals: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor,
                views: Orbit, depth_tolerance: float = 0.01, cos_power: float = 2.0, min_cos: float = 0.1,
                two_sided: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean colour of surface points over the views that see them.

    ``points``/``normals [T, 3]`` (world, unit normals), the mesh ``vertices [V, 3]``/``faces [F, 3]`` for the
    z-buffers, ``views`` (straight-alpha RGBA, white background). A view contributes where the point is in
    the image, not occluded (camera z <= z-buffer + ``depth_tolerance`` (world units) + one pixel footprint
    times the surface slope tan(angle to the camera), capped at 4), inside the alpha mask
    (alpha >= 0.5) and seen at cos >= ``min_cos``; weight ``cos ** cos_power`` (``|cos|`` if ``two_sided``,
    for meshes without a consistent outward orientation). Returns ``rgb [T, 3]`` (0 where unseen) and the
    summed weights ``[T]``."""
    acc = torch.zeros(len(points), 3, dtype=torch.float64)
    wsum = torch.zeros(len(points), dtype=torch.float64)
    for i in range(len(views)):
        c2w, K = views.c2w[i], views.K[i]
        H, W = views.rgba.shape[1:3]
        uv, z = cameras.project(points, c2w, K)
        cos = (normals * F.normalize(c2w[:3, 3].to(points.dtype) - points, dim=-1)).sum(-1)
        cos = cos.abs() if two_sided else cos
        ok = (cos >= min_cos) & (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] <= W) & (uv[:, 1] >= 0) & (uv[:, 1] <= H)
        idx = ok.nonzero()[:, 0]
        if not len(idx):
            continue
        zbuf = depth_map(vertices, faces, c2w, K, W, H)
        # slack for the z-buffer's sampling: one pixel footprint times the slope of the surface
        c = cos[idx].clamp(0.25, 1.0)
        slack = z[idx] / K[0, 0] * (1 - c ** 2).sqrt() / c
        visible = z[idx] <= _zbuffer_at(zbuf, uv[idx]) + depth_tolerance + slack
        rgba = views.rgba[i].to(torch.float64)
        premult = torch.cat([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], -1)
        s = _sample(premult, uv[idx])
        alpha = s[:, 3]
        keep = visible & (alpha >= 0.5)
        idx, rgb = idx[keep], s[keep, :3] / alpha[keep, None]
        w = cos[idx] ** cos_power
        acc.index_add_(0, idx, w[:, None] * rgb)
        wsum.index_add_(0, idx, w)
    return acc / wsum.clamp_min(1e-12)[:, None], wsum


def dilate(image: torch.Tensor, filled: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow the filled region of ``image [H, W, C]`` (mask ``filled [H, W]``) by ``iterations`` texels: each
    new texel takes the mean of its filled 8-neighbours. Returns the image and the grown mask."""
    img, mask = image.clone(), filled.clone()
    for _ in range(iterations):
        stacked = torch.cat([img * mask[..., None], mask[..., None]], -1).permute(2, 0, 1).float()
        pooled = F.avg_pool2d(stacked[None], 3, stride=1, padding=1)[0].permute(1, 2, 0).to(img.dtype)
        grow = ~mask & (pooled[..., -1] > 0)
        if not grow.any():
            break
        img[grow] = pooled[grow][:, :-1] / pooled[grow][:, -1:]
        mask = mask | grow
    return img, mask


# ------------------------------------------------------------------------------------------------- bake

def bake_texture(mesh: trimesh.Trimesh, views: Orbit, size: int = 1024, fallback: ColorFn | None = None,
                 dilation: int = 4, depth_tolerance: float = 0.01, cos_power: float = 2.0,
                 min_cos: float = 0.1) -> trimesh.Trimesh:
    """A copy of the world-space ``mesh`` with a UV atlas (``size``² RGB texture) baked from ``views``.

    Vertices are split along chart seams (same positions). Texels no view sees take ``fallback`` (without
    one: the dilation and then the mean colour). The result carries a glTF PBR material
    (baseColorTexture, white factor, metallic 0, roughness 1) that trimesh writes to GLB and OBJ+MTL."""
    if len(mesh.faces) == 0:
        raise Hi3DError("texture baking: the mesh has no faces")
    vmap, faces_np, uv_np = uv_unwrap(mesh, size)
    vmap_t = torch.from_numpy(vmap)
    vertices = torch.as_tensor(mesh.vertices, dtype=torch.float64)
    outward = mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    vnormals = torch.tensor(np.asarray(mesh.vertex_normals), dtype=torch.float64)
    uv, faces = torch.from_numpy(uv_np), torch.from_numpy(faces_np)
    texel, points, normals = texel_samples(uv, faces, vertices[vmap_t], vnormals[vmap_t], size)
    rgb, weight = view_colors(points, normals, vertices, torch.as_tensor(mesh.faces, dtype=torch.long), views,
                              depth_tolerance, cos_power, min_cos, two_sided=not outward)
    seen = weight > 0
    if fallback is not None and (~seen).any():
        rgb[~seen] = fallback(points[~seen], normals[~seen]).to(rgb.dtype).clamp(0, 1)
        seen[:] = True
    image = torch.zeros(size * size, 3, dtype=torch.float64)
    filled = torch.zeros(size * size, dtype=torch.bool)
    image[texel[seen]], filled[texel[seen]] = rgb[seen], True
    image, filled = dilate(image.view(size, size, 3), filled.view(size, size), dilation)
    if filled.any():
        image[~filled] = image[filled].mean(0)
    pixels = (image.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    material = trimesh.visual.material.PBRMaterial(
        name="mesh", baseColorTexture=Image.fromarray(pixels), baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0, roughnessFactor=1.0)
    out = trimesh.Trimesh(mesh.vertices[vmap], faces_np, process=False)
    out.visual = trimesh.visual.TextureVisuals(uv=uv_np, material=material)
    return out


def texture_image(mesh: trimesh.Trimesh) -> np.ndarray:
    """The base-colour texture of a textured mesh as uint8 ``[H, W, C]``."""
    mat = mesh.visual.material
    img = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
    return np.asarray(img.convert("RGB"))


def vertex_colored(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """A textured mesh as a vertex-coloured one: seam copies merged back into one vertex (by position), each
    vertex the mean of the bilinear texture samples at its UVs (RGBA uint8, alpha 255)."""
    img = torch.from_numpy(texture_image(mesh).astype(np.float64) / 255)
    H, W = img.shape[:2]
    uv = torch.as_tensor(mesh.visual.uv, dtype=torch.float64)
    rgb = _sample(img, torch.stack([uv[:, 0] * W, (1 - uv[:, 1]) * H], -1)).numpy()
    unique, inverse = trimesh.grouping.unique_rows(mesh.vertices)[:2]
    inverse = np.asarray(inverse)
    counts = np.bincount(inverse, minlength=len(unique))[:, None]
    col = np.zeros((len(unique), 3))
    np.add.at(col, inverse, rgb)
    col = np.round(col / counts * 255)
    out = trimesh.Trimesh(mesh.vertices[unique], inverse[mesh.faces], process=False)
    rgba = np.concatenate([col, np.full((len(col), 1), 255)], 1).astype(np.uint8)
    out.visual = trimesh.visual.ColorVisuals(out, vertex_colors=rgba)
    return out
