"""UV texture baking (xatlas atlas, UV-space rasteriser, view projection with z-buffer visibility) and the
textured export (GLB baseColorTexture, OBJ + MTL + PNG, PLY vertex colours)."""

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from hi3d import cameras
from hi3d.data.mesh_io import as_trimesh, load_mesh, load_scene
from hi3d.data.orbit import Orbit
from hi3d.errors import Hi3DError
from hi3d.recon.texture import bake_texture, depth_map, rasterize_triangles, texture_image


def rasterize_dense(tri, width, height):
    """Reference: every pixel centre against every triangle (edge functions), no bounding boxes."""
    v, u = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    p = torch.stack([u, v], -1).reshape(-1, 1, 2).double()
    a, b, c = tri.double().unbind(1)
    cross = lambda s, t: s[..., 0] * t[..., 1] - s[..., 1] * t[..., 0]  # noqa: E731
    area = cross(b - a, c - a)
    w0, w1 = cross(c - b, p - b) / area, cross(a - c, p - c) / area
    bary = torch.stack([w0, w1, 1 - w0 - w1], -1)  # [P, F, 3]
    inside = (bary >= -1e-9).all(-1) & (area.abs() > 1e-12)
    pix, face = inside.nonzero(as_tuple=True)
    return pix, face, bary[pix, face]


def test_rasterizer_matches_dense_reference():
    g = torch.Generator().manual_seed(0)
    tri = torch.rand(40, 3, 2, generator=g, dtype=torch.float64) * torch.tensor([30.0, 24.0]) - 3  # some cross the border
    tri[0] = torch.tensor([[2.0, 2.0], [10.0, 2.0], [6.0, 2.0]])  # degenerate: covers nothing
    tri[1] = torch.tensor([[0.0, 0.0], [24.0, 0.0], [0.0, 20.0]])  # large
    for max_pairs in (1 << 20, 7):  # one chunk, and one face (or a few) at a time
        pix, face, bary = rasterize_triangles(tri, 24, 20, max_pairs=max_pairs)
        ref_pix, ref_face, ref_bary = rasterize_dense(tri, 24, 20)
        got = sorted(zip(pix.tolist(), face.tolist()))
        assert got == sorted(zip(ref_pix.tolist(), ref_face.tolist())) and len(got) > 100
        order, ref_order = np.lexsort((face, pix)), np.lexsort((ref_face, ref_pix))
        torch.testing.assert_close(bary[order], ref_bary[ref_order], rtol=0, atol=1e-12)
    centre = torch.stack([pix % 24, pix // 24], -1) + 0.5
    torch.testing.assert_close((bary[:, :, None] * tri[face]).sum(1), centre.double(), rtol=0, atol=1e-9)
    assert not (face == 0).any()


def test_depth_map_matches_the_renderer(spider_path):
    from hi3d.data.render import render_views

    scene, _ = load_mesh(spider_path)
    mesh = as_trimesh(scene)
    c2w, _, _ = cameras.orbit_poses(3, 30.0)
    K = cameras.intrinsics(48)
    gt = render_views(scene, c2w, K, 48, 48).depth.double()
    for i in range(3):
        d = depth_map(torch.as_tensor(mesh.vertices), torch.as_tensor(mesh.faces), c2w[i], K, 48, 48)
        hit = gt[i] > 0
        assert (d.isfinite() != hit).sum() <= 2 and hit.sum() > 150  # a pixel centre grazing an edge may differ
        both = hit & d.isfinite()
        assert (d[both] - gt[i][both]).abs().median() < 1e-5 and (d[both] - gt[i][both]).abs().max() < 1e-3


def solid_views(c2w, size, rgb):
    """Views of one colour everywhere with full alpha (every pixel 'on the object')."""
    n = len(c2w)
    rgba = torch.ones(n, size, size, 4)
    rgba[..., :3] = torch.tensor(rgb)
    az, el, r = cameras.azimuth_elevation_radius(c2w)
    return Orbit(rgba=rgba, c2w=c2w, K=cameras.intrinsics(size).expand(n, 3, 3).clone(), azimuth_deg=az,
                 elevation_deg=el, radius=r)


def texels(mesh):
    """(texture [S, S, 3] float, 3D point of each texel centre covered by the atlas [T, 3], their texture rows/cols)."""
    from hi3d.recon.texture import texel_samples

    img = texture_image(mesh).astype(np.float64) / 255
    uv, faces = torch.as_tensor(mesh.visual.uv), torch.as_tensor(mesh.faces)
    v = torch.as_tensor(mesh.vertices)
    idx, pts, _ = texel_samples(uv, faces, v, v, len(img))
    return img, pts.numpy(), (idx // len(img)).numpy(), (idx % len(img)).numpy()


def test_occluded_texels_take_the_fallback():
    """Two parallel squares seen from the front camera: the back square's texels in the front square's shadow
    are occluded (fallback red), the rest of both squares is seen (view green)."""
    def square(y, half):
        s = trimesh.creation.box([2 * half, 1e-9, 2 * half])
        quad = trimesh.Trimesh(s.vertices, s.faces[np.abs(s.face_normals[:, 1]) > 0.5][:2])  # one side, open
        quad.apply_translation([0, y, 0])
        return trimesh.Trimesh(*trimesh.remesh.subdivide_to_size(quad.vertices, quad.faces, 0.05))
    mesh = trimesh.util.concatenate([square(-0.2, 0.2), square(0.2, 0.4)])
    views = solid_views(cameras.orbit_c2w(torch.tensor([0.0]), torch.tensor([0.0])), 64, [0.0, 1.0, 0.0])
    red = lambda p, n: torch.tensor([1.0, 0.0, 0.0]).expand(len(p), 3)  # noqa: E731
    out = bake_texture(mesh, views, 128, fallback=red)
    img, pts, rows, cols = texels(out)
    col = img[rows, cols]
    back, front = pts[:, 1] > 0, pts[:, 1] < 0
    shadow = 0.2 * 1.7 / 1.3  # the front square (half-size 0.2, camera z 1.3) projected onto the back one (1.7)
    size = np.abs(pts[:, [0, 2]]).max(1)
    for sel, rgb in [(front, [0, 1, 0]), (back & (size < shadow - 0.02), [1, 0, 0]), (back & (size > shadow + 0.02), [0, 1, 0])]:
        assert sel.sum() > 500 and np.abs(col[sel] - rgb).max() < 1 / 255


def test_bake_spider_from_its_views_and_export(tmp_path, spider_path):
    """Bake the textured spider's flat-shaded 16-view orbit onto its own mesh, re-render, compare, export."""
    from hi3d.data.render import render_views
    from hi3d.recon.mesh import export_mesh

    scene, normalization = load_mesh(spider_path)
    mesh = as_trimesh(scene)
    geo = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)  # geometry only: the texture comes from views
    c2w, _, _ = cameras.orbit_poses(16, 20.0)
    K = cameras.intrinsics(128)
    gt = render_views(scene, c2w, K, 128, 128, shading="flat", with_depth=False)
    out = bake_texture(geo, gt, 256)
    uv = np.asarray(out.visual.uv)
    assert np.isfinite(uv).all() and uv.min() >= 0 and uv.max() <= 1 and len(out.faces) == len(geo.faces)
    np.testing.assert_array_equal(np.sort(np.unique(out.vertices, axis=0), 0), np.sort(np.unique(geo.vertices, axis=0), 0))
    assert texture_image(out).shape == (256, 256, 3)

    re = render_views(out, c2w, K, 128, 128, shading="flat", with_depth=False)
    mask = (gt.rgba[..., 3:] > 0.99) & (re.rgba[..., 3:] > 0.99)
    assert mask.float().mean() > 0.05 and (mask == (gt.rgba[..., 3:] > 0.99)).float().mean() > 0.99
    def masked_psnr(pred):  # dB over the object pixels of all views
        mse = ((pred - gt.rgba[..., :3]) ** 2 * mask).sum() / (3 * mask.sum())
        return float(-10 * torch.log10(mse))

    baked = masked_psnr(re.rgba[..., :3])
    flat = masked_psnr(gt.rgba[..., :3][mask[..., 0]].mean(0))  # baseline: the object's mean colour everywhere
    assert torch.isfinite(re.rgba).all()
    print(f"spider bake PSNR {baked:.2f} dB inside the mask, mean colour {flat:.2f} dB")
    assert baked > 33 and baked > flat + 8  # measured 35.4 dB vs 24.9 dB
    paths = export_mesh(out, normalization, tmp_path)
    assert {p.name for p in paths.values()} >= {"mesh.glb", "mesh.obj", "mesh.mtl", "mesh.png", "mesh.ply"}
    assert "map_Kd mesh.png" in paths["mtl"].read_text() and Image.open(paths["png"]).size == (256, 256)
    source = as_trimesh(load_scene(spider_path))
    for fmt in ("glb", "obj"):
        got = as_trimesh(load_scene(paths[fmt]))
        assert got.visual.kind == "texture" and texture_image(got).shape == (256, 256, 3), fmt
        assert len(got.faces) == len(geo.faces), fmt
        np.testing.assert_allclose(got.bounds, source.bounds, atol=1e-5 * source.extents.max())
        np.testing.assert_allclose(texture_image(got), texture_image(out), atol=0)
        np.testing.assert_allclose(got.visual.uv, uv, atol=1e-6)
    ply = as_trimesh(load_scene(paths["ply"]))
    assert ply.visual.kind == "vertex" and len(ply.faces) == len(geo.faces)
    assert len(ply.vertices) == len(np.unique(geo.vertices, axis=0))  # seams welded back
    np.testing.assert_allclose(ply.bounds, source.bounds, atol=1e-5 * source.extents.max())


def test_extract_mesh_bakes_views_and_fills_unseen_from_the_colour_network():
    from hi3d.recon.mesh import MeshConfig, extract_mesh, surface_colors
    from hi3d.recon.neus import NeuSConfig, NeuSModel

    model = NeuSModel(NeuSConfig(num_levels=4, max_resolution=32, start_levels=4, init_radius=0.4),
                      torch.Generator().manual_seed(0))
    c2w, _, _ = cameras.orbit_poses(4, 30.0)  # from above: the underside is never seen
    views = solid_views(c2w, 48, [0.2, 0.4, 0.9])
    cfg = MeshConfig(resolution=40, texture="views", texture_size=96, texture_max_faces=1500)
    mesh = extract_mesh(model, cfg, views)
    assert mesh.visual.kind == "texture" and len(mesh.faces) <= 1500 and texture_image(mesh).shape == (96, 96, 3)
    img, pts, rows, cols = texels(mesh)
    col = img[rows, cols]
    top, bottom = pts[:, 2] > 0.15, pts[:, 2] < -0.3
    assert top.sum() > 100 and bottom.sum() > 100
    assert np.abs(col[top] - [0.2, 0.4, 0.9]).max() < 1 / 255
    net = surface_colors(model, torch.as_tensor(pts[bottom])).numpy()  # normals of the sphere ~ SDF gradient
    assert np.abs(col[bottom] - net).max() < 0.03 and np.abs(net - [0.2, 0.4, 0.9]).max() > 0.1
    with pytest.raises(Hi3DError, match="needs the views"):
        extract_mesh(model, cfg)
    with pytest.raises(Hi3DError, match="texture_size"):
        extract_mesh(model, MeshConfig(resolution=40, texture_size=0), views)
    with pytest.raises(Hi3DError, match="unknown mesh.texture"):
        extract_mesh(model, MeshConfig(resolution=40, texture="uv"), views)
