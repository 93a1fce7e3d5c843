"""Visual hull: silhouette carving of points, shared by the 3DGS initialisation, the elevation estimator and
the ablation's fast stand-in reconstructor."""

from __future__ import annotations

import torch

from hi3d import cameras


def carve(points: torch.Tensor, masks: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, slack: int = 0,
          outside_frame_carves: bool = True) -> torch.Tensor:
    """``[P]`` bool: world points ``[P, 3]`` whose projection falls inside at least ``N - slack`` of the
    silhouettes ``masks [N, H, W]`` (bool) seen by the OpenCV cameras ``c2w [N, 4, 4]`` with intrinsics
    ``K [N, 3, 3]`` or ``[3, 3]`` (pixels of the masks). A point behind a camera or outside its frame counts
    as outside that silhouette when ``outside_frame_carves``, else as inside."""
    N, H, W = masks.shape
    K = torch.as_tensor(K).expand(N, 3, 3)
    misses = torch.zeros(len(points), dtype=torch.int32)
    for i in range(N):
        uv, z = cameras.project(points, c2w[i], K[i])
        col, row = uv[:, 0].floor().long(), uv[:, 1].floor().long()
        in_frame = (z > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)
        hit = torch.full((len(points),), not outside_frame_carves)
        hit[in_frame] = masks[i, row[in_frame], col[in_frame]].bool()
        misses += ~hit
    return misses <= slack
