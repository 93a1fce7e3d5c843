"""Mesh extraction (marching cubes on the NeuS SDF, components, colours) and export (GLB/OBJ/PLY, +Y up)."""

import numpy as np
import pytest
import torch
import trimesh

from hi3d.data.mesh_io import as_trimesh, load_mesh, load_scene, load_world_mesh
from hi3d.errors import Hi3DError
from hi3d.recon.mesh import MeshConfig, export_mesh, extract_mesh, keep_largest, marching_cubes, sdf_volume
from hi3d.recon.neus import NeuSConfig, NeuSModel


def sphere_volume(res=48, bound=0.55, center=(0.0, 0.0, 0.0), r=0.3):
    ax = torch.linspace(-bound, bound, res)
    p = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1)
    return (p - torch.tensor(center)).norm(dim=-1) - r


def test_marching_cubes_places_an_outward_sphere_in_world_units():
    mesh = marching_cubes(sphere_volume(center=(0.1, -0.2, 0.05)), 0.55)
    radii = np.linalg.norm(mesh.vertices - [0.1, -0.2, 0.05], axis=1)
    assert np.abs(radii - 0.3).max() < 0.01
    assert mesh.volume == pytest.approx(4 / 3 * np.pi * 0.3 ** 3, rel=0.03)  # positive: normals point out
    with pytest.raises(Hi3DError, match="zero crossing"):
        marching_cubes(sphere_volume() + 1.0, 0.55)


def test_keep_largest_component():
    big, small = trimesh.creation.icosphere(2, 0.3), trimesh.creation.icosphere(2, 0.05)
    small.apply_translation([0.4, 0, 0])
    both = trimesh.util.concatenate([big, small])
    kept = keep_largest(both, 1)
    assert len(kept.faces) == len(big.faces) and np.allclose(kept.bounds, big.bounds)
    assert len(keep_largest(both, 0).faces) == len(both.faces)


def test_sparse_sdf_volume_matches_dense_near_the_surface():
    model = NeuSModel(NeuSConfig(num_levels=4, max_resolution=32, start_levels=4), torch.Generator().manual_seed(0))
    dense = sdf_volume(model, 33, 0.55, coarse_factor=1)
    sparse = sdf_volume(model, 33, 0.55, coarse_factor=4)
    near = dense.abs() < 0.05
    assert near.any()
    torch.testing.assert_close(sparse[near], dense[near], rtol=0, atol=1e-6)
    assert ((sparse < 0) == (dense < 0)).all()


def test_extract_mesh_of_initial_sphere_has_colours():
    model = NeuSModel(NeuSConfig(num_levels=4, max_resolution=32, start_levels=4, init_radius=0.4),
                      torch.Generator().manual_seed(0))
    mesh = extract_mesh(model, MeshConfig(resolution=48, texture="vertex"))
    r = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(r.mean() - 0.4) < 0.01 and r.std() < 0.01
    cols = mesh.visual.vertex_colors
    assert cols.shape == (len(mesh.vertices), 4) and cols[:, 3].min() == 255


def test_export_restores_source_frame_and_formats_agree(tmp_path, bunny_path):
    """A world-space mesh exported with the orbit normalisation lands where the source file has it (+Y up)."""
    scene, normalization = load_mesh(bunny_path)
    world = as_trimesh(scene)
    world.visual = trimesh.visual.ColorVisuals(world, vertex_colors=np.tile([200, 30, 30, 255], (len(world.vertices), 1)))
    paths = export_mesh(world, normalization, tmp_path)
    source = as_trimesh(load_scene(bunny_path))
    tol = 0.02 * source.extents.max()
    for fmt, path in paths.items():
        got = as_trimesh(load_scene(path))
        assert np.abs(got.bounds - source.bounds).max() < tol, fmt
        assert len(got.faces) == len(world.faces), fmt
    glb = as_trimesh(load_scene(paths["glb"]))
    # +Y up: the file's y extent is the world's (+Z up) height; (x, y, z)_file = (x, z, -y)_world
    np.testing.assert_allclose(glb.extents / glb.extents.max(),
                               world.extents[[0, 2, 1]] / world.extents.max(), atol=1e-4)
    back = load_world_mesh(paths["ply"], normalization)
    np.testing.assert_allclose(back.bounds, world.bounds, atol=1e-5)
    vertex = next(line for line in paths["obj"].read_text().splitlines() if line.startswith("v "))
    assert len(vertex.split()) == 7  # x y z r g b: vertex colours kept
    np.testing.assert_allclose([float(c) for c in vertex.split()[4:]], [200 / 255, 30 / 255, 30 / 255], atol=0.01)


def surface_distances(a: trimesh.Trimesh, b: trimesh.Trimesh, num_points: int = 4000) -> np.ndarray:
    """Distances from points sampled on ``a`` to the surface of ``b`` (exact point-to-triangle)."""
    from hi3d.eval.metrics import sample_surface

    return trimesh.proximity.closest_point(b, sample_surface(a, num_points, seed=1))[1]


@pytest.mark.parametrize("faces, mean_bound", [(20000, 5e-4), (2000, 3e-3)])
def test_decimate_bunny_keeps_the_surface(bunny_path, faces, mean_bound):
    from hi3d.recon.mesh import decimate

    world = load_world_mesh(bunny_path)
    bunny = trimesh.Trimesh(world.vertices, world.faces)  # 69,666 faces, watertight, one piece, unit cube
    out = decimate(bunny, faces)
    assert abs(len(out.faces) - faces) <= 0.01 * faces
    assert out.is_watertight and len(out.split(only_watertight=False)) == 1
    assert out.volume == pytest.approx(bunny.volume, rel=0.01)
    # two-sided point-to-surface Chamfer (measured: 2.3e-4 / 1.6e-3 mean, 2e-3 / 1.6e-2 max one way)
    d = np.concatenate([surface_distances(out, bunny), surface_distances(bunny, out)])
    assert d.mean() < mean_bound and d.max() < 0.03
    assert decimate(bunny, 0) is bunny
