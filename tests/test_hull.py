import torch

from hi3d import cameras as C
from hi3d.recon.hull import carve


def _sphere_silhouettes(n=8, size=64, radius=0.3):
    """Exact silhouettes ``[n, size, size]`` of a sphere of ``radius`` at the origin seen from an orbit."""
    c2w, K = C.orbit_c2w(C.orbit_azimuths(n), torch.full((n,), 20.0)), C.intrinsics(size)
    masks = []
    for cam in c2w:
        o, d = C.get_rays(cam.double(), K.double(), size, size, torch.float64)
        closest = (o - (o * d).sum(-1, keepdim=True) * d).norm(dim=-1)  # ray's distance to the centre
        masks.append(closest < radius)
    return torch.stack(masks), c2w, K


def test_carving_keeps_the_sphere_and_removes_what_a_view_sees_past():
    masks, c2w, K = _sphere_silhouettes()
    g = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pts = g / g.norm(dim=-1, keepdim=True) * torch.rand(4000, 1, generator=torch.Generator().manual_seed(1),
                                                         dtype=torch.float64) * 0.6
    kept = carve(pts, masks, c2w, K)
    r = pts.norm(dim=-1)
    assert kept[r < 0.27].all()  # inside the sphere, more than a pixel (0.02) from its rim: in every silhouette
    assert not kept[r > 0.35].any()  # outside the hull of 8 views around it
    assert carve(pts, masks, c2w, K, slack=len(masks)).all()  # N misses allowed: nothing carved


def test_points_outside_a_frame_carve_only_when_asked():
    masks, c2w, K = _sphere_silhouettes(n=4)
    far = torch.tensor([[0.0, 0.0, 5.0]], dtype=torch.float64)  # above every camera's frame
    assert not carve(far, masks, c2w, K).any()
    assert carve(far, masks, c2w, K, outside_frame_carves=False).all()
