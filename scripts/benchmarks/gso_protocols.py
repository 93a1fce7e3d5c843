"""Both GSO mesh protocols on real meshes with perturbed copies, and where the uniform volume IoU parts from
others' occupancy (run by hand).

    python scripts/benchmarks/gso_protocols.py [--out scripts/benchmarks/results] [--objects bunny,spider,wuson]

For each object (hi3d's world frame, ``mesh_io.load_mesh``) and each perturbation of it (the prediction), writes:
- ``syncdreamer``: Chamfer of depth point clouds and mesh2sdf volume IoU (``hi3d.eval.syncdreamer``);
- ``uniform``: Chamfer of 100k surface samples and ray-vote volume IoU (``hi3d.eval.metrics``);
- on the uniform IoU's own 64³ grid: IoU by trimesh's ``contains``, and the share of occupied cells whose
  6 ray parities disagree (cells an open mesh makes ambiguous; 0 for a closed surface).
Writes ``gso_protocols.json`` and ``gso_protocols.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import trimesh

from hi3d.data.mesh_io import as_trimesh, load_mesh
from hi3d.data.real_objects import resolve_object
from hi3d.eval import metrics
from hi3d.eval import syncdreamer as sd

PERTURBATIONS = {
    "scale1.06+shift0.02": (1.06, 0.0, (0.02, 0.0, 0.0)),  # scale about the origin, turn about +Z (deg), shift
    "turn10+shift0.03": (1.0, 10.0, (0.0, 0.03, 0.0)),
}


def perturbed(mesh: trimesh.Trimesh, scale: float, turn_deg: float, shift) -> trimesh.Trimesh:
    out = mesh.copy()
    out.apply_scale(scale)
    out.apply_transform(trimesh.transformations.rotation_matrix(np.deg2rad(turn_deg), [0, 0, 1]))
    out.apply_translation(shift)
    return out


def contains_iou(pred: trimesh.Trimesh, gt: trimesh.Trimesh, bounds: np.ndarray, resolution: int = 64) -> float:
    axes = metrics.grid_points(bounds, resolution)
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inside = [np.concatenate([m.contains(pts[i:i + 20000]) for i in range(0, len(pts), 20000)]) for m in (pred, gt)]
    return float((inside[0] & inside[1]).sum() / max((inside[0] | inside[1]).sum(), 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="scripts/benchmarks/results")
    p.add_argument("--objects", default="bunny,spider,wuson")
    args = p.parse_args()
    rows = []
    for name in args.objects.split(","):
        gt = as_trimesh(load_mesh(resolve_object(name))[0])
        gt_cloud = sd.surface_cloud(gt)
        for label, (scale, turn, shift) in PERTURBATIONS.items():
            t = time.perf_counter()
            pred = perturbed(gt, scale, turn, shift)
            bounds = metrics.iou_bounds(pred, gt)
            votes = [metrics.occupancy_votes(m, bounds) for m in (pred, gt)]
            occupied = [v >= 4 for v in votes]
            row = {"object": name, "watertight": bool(gt.is_watertight), "perturbation": label,
                   "syncdreamer_chamfer": sd.chamfer(sd.surface_cloud(pred), gt_cloud),
                   "syncdreamer_volume_iou": sd.volume_iou(pred, gt),
                   "uniform_chamfer": metrics.chamfer_distance(pred, gt),
                   "uniform_volume_iou": metrics.volume_iou(pred, gt),
                   "contains_iou_same_grid": contains_iou(pred, gt, bounds),
                   "ambiguous_cells_gt": float(((votes[1] > 0) & (votes[1] < 6)).sum() / max(occupied[1].sum(), 1))}
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gso_protocols.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = [k for k in rows[0] if k not in ("object", "perturbation", "seconds")]
    md = ["| object | perturbation | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    md += [f"| {r['object']} | {r['perturbation']} | " + " | ".join(
        str(r[k]) if isinstance(r[k], bool) else f"{r[k]:.4f}" for k in keys) + " |" for r in rows]
    (out / "gso_protocols.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
