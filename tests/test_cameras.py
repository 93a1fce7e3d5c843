import math

import pytest
import torch

from hi3d import cameras as C


def test_azimuth_zero_camera_on_minus_y_looking_at_origin():
    c2w = C.orbit_c2w(0.0, 0.0, 1.5)
    torch.testing.assert_close(c2w[:3, 3], torch.tensor([0.0, -1.5, 0.0], dtype=torch.float64))
    # x right = +X, y down = -Z, z forward = +Y (hand-computed)
    expected = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=torch.float64)
    torch.testing.assert_close(c2w[:3, :3], expected)


def test_azimuth_counter_clockwise_from_above_and_elevation_up():
    p = C.camera_position(90.0, 0.0, 2.0)
    torch.testing.assert_close(p, torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    p = C.camera_position(0.0, 30.0, 2.0)
    assert p[2] == pytest.approx(1.0) and p[1] == pytest.approx(-math.sqrt(3))


def test_orbit_poses_rotation_orthonormal_and_looking_at_origin():
    c2w, az, el = C.orbit_poses(16, 20.0, 1.5, azimuth_offset_deg=10.0)
    assert c2w.shape == (16, 4, 4) and az[0] == 10.0 and az[1] == pytest.approx(32.5)
    R = c2w[:, :3, :3]
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3, dtype=R.dtype).expand(16, 3, 3))
    assert torch.allclose(torch.linalg.det(R), torch.ones(16, dtype=R.dtype))
    forward = R[:, :, 2]
    torch.testing.assert_close(forward, -c2w[:, :3, 3] / 1.5)
    assert (R[:, 2, 1] < 0).all()  # image "down" points downwards in the world
    az2, el2, r2 = C.azimuth_elevation_radius(c2w)
    torch.testing.assert_close(az2, az % 360)
    torch.testing.assert_close(el2, el)
    torch.testing.assert_close(r2, torch.full((16,), 1.5, dtype=torch.float64))


def test_intrinsics_hand_computed():
    K = C.intrinsics(256, fov_deg=90.0)
    torch.testing.assert_close(K, torch.tensor([[128.0, 0, 128], [0, 128, 128], [0, 0, 1]], dtype=torch.float64))
    K2 = C.intrinsics(512, 256, fov_deg=C.DEFAULT_FOV_DEG)
    assert K2[0, 2] == 256 and K2[1, 2] == 128 and K2[0, 0] == K2[1, 1]
    torch.testing.assert_close(C.scale_intrinsics(C.intrinsics(128), 2.0), C.intrinsics(256))


def test_project_hand_computed_and_unproject_roundtrip():
    c2w = C.orbit_c2w(0.0, 0.0, 1.5)
    K = C.intrinsics(256, fov_deg=90.0)
    # world +X is image right, world +Z is image up; camera z depth of the origin is 1.5
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.75, 0.0, 0.0], [0.0, 0.0, 0.75]], dtype=torch.float64)
    uv, z = C.project(pts, c2w, K)
    torch.testing.assert_close(uv, torch.tensor([[128.0, 128], [192, 128], [128, 64]], dtype=torch.float64))
    torch.testing.assert_close(z, torch.full((3,), 1.5, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(100, 3, generator=g, dtype=torch.float64) - 0.5
    c2w = C.orbit_c2w(37.0, 25.0, 1.5)
    uv, z = C.project(pts, c2w, K)
    torch.testing.assert_close(C.unproject(uv, z, c2w, K), pts)


def test_rays_pass_through_projected_pixels():
    c2w, K = C.orbit_c2w(120.0, -10.0, 1.5), C.intrinsics(32, 24)
    o, d = C.get_rays(c2w, K, 32, 24, dtype=torch.float64)
    assert o.shape == d.shape == (24, 32, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(24, 32, dtype=torch.float64))
    # a point along pixel (row 5, col 7)'s ray projects back onto that pixel centre
    p = o[5, 7] + 1.3 * d[5, 7]
    uv, _ = C.project(p[None], c2w, K)
    torch.testing.assert_close(uv[0], torch.tensor([7.5, 5.5], dtype=torch.float64))


def test_interpolated_views_between_neighbours_on_orbit():
    _, az, el = C.orbit_poses(16, 20.0)
    iaz, iel, ir = C.interpolated_views(az, el, 1.5, 16)
    torch.testing.assert_close(iaz, (az + 11.25) % 360)
    torch.testing.assert_close(iel, el)
    for m in (0, 5, 8, 32, 48):
        iaz, iel, ir = C.interpolated_views(az, el, 1.5, m)
        assert iaz.numel() == m
        torch.testing.assert_close(ir, torch.full((m,), 1.5, dtype=torch.float64))
        # never on an orbit view: every azimuth strictly inside a gap
        frac = (iaz % 22.5) / 22.5
        assert ((frac > 1e-9) & (frac < 1 - 1e-9)).all()
    iaz, _, _ = C.interpolated_views(az, el, 1.5, 32)
    torch.testing.assert_close(iaz[:2], torch.tensor([7.5, 15.0], dtype=torch.float64))


def test_interpolation_wraps_short_way_and_blends_elevation():
    az = torch.tensor([350.0, 10.0])
    el = torch.tensor([0.0, 30.0])
    iaz, iel, _ = C.interpolated_views(az, el, 1.5, 2)
    torch.testing.assert_close(iaz, torch.tensor([0.0, 180.0], dtype=torch.float64))
    torch.testing.assert_close(iel, torch.tensor([15.0, 15.0], dtype=torch.float64))


def test_convention_conversions_agree():
    c2w = C.orbit_c2w(torch.tensor([0.0, 77.0]), torch.tensor([10.0, 40.0]))
    gl = C.opencv_to_opengl(c2w)
    # OpenGL cameras look along -z and have y up
    torch.testing.assert_close(gl[:, :3, 2], -c2w[:, :3, 2])
    torch.testing.assert_close(C.opengl_to_opencv(gl), c2w)
    vm = C.to_viewmat(c2w)
    pts = torch.rand(10, 3, dtype=torch.float64)
    cam = pts @ vm[0, :3, :3].T + vm[0, :3, 3]
    torch.testing.assert_close(cam, C.world_to_camera(pts, c2w[0]))
    torch.testing.assert_close(C.from_viewmat(vm), c2w)
    # glTF +Y up: the up vector maps to +Z, glTF front (+Z) faces the azimuth-0 camera (at -Y)
    up = C.YUP_TO_ZUP[:3, :3] @ torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    front = C.YUP_TO_ZUP[:3, :3] @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(up, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(front, torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(C.c2w_world_yup_to_zup(C.c2w_world_zup_to_yup(c2w)), c2w)


def test_look_at_straight_down_is_an_error():
    with pytest.raises(ValueError, match="parallel"):
        C.orbit_c2w(0.0, 90.0)
