"""Cost of the bit-reproducible hash-grid gather (run by hand): forward + backward of the NeuS CPU config's
encoding (12 levels x 2 features, 2^15 rows, 256 max resolution) on ``--points`` points, with the rows
gathered by ``index_select`` (backward: ``index_add_``, a fixed order: what ``HashGrid`` does) and by
advanced indexing ``table[idx]`` (backward: ``index_put_`` with accumulate, a thread-dependent order on
CPU: what it did before). Also reports whether repeated backwards give identical gradients.

    .venv/bin/python scripts/benchmarks/hashgrid.py [--points 65536] [--threads 2] [--repeats 5] [--out DIR]

Writes ``OUT/hashgrid.json`` and ``OUT/hashgrid.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hi3d.io import write_json  # noqa: E402
from hi3d.recon.hashgrid import HashGrid  # noqa: E402


def encode_advanced_indexing(grid: HashGrid, x: torch.Tensor) -> torch.Tensor:
    """``HashGrid.forward`` with the rows gathered by ``table[idx]`` (the previous, non-reproducible gather)."""
    x = x.clamp(0.0, 1.0)
    pos = x[:, None, :] * grid.resolutions.to(x.dtype)[None, :, None]
    base = pos.detach().floor().clamp(max=grid.resolutions.view(1, -1, 1) - 1)
    frac = pos - base
    wx, wy, wz = torch.stack([1 - frac, frac], dim=-1).unbind(2)
    w = (wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]).flatten(2)
    feats = grid.table[grid._index(base.int(), grid.num_levels).long()]
    return torch.einsum("nlc,nlcf->nlf", w, feats.to(x.dtype)).reshape(x.shape[0], -1)


def measure(fn, grid, x, g, repeats):
    grads, times = [], []
    for i in range(repeats + 1):
        grid.table.grad = None
        t = time.perf_counter()
        (fn(x) * g).sum().backward()
        if i:  # first call: warm-up
            times.append(time.perf_counter() - t)
        grads.append(grid.table.grad.clone())
    same = all(torch.equal(grads[0], q) for q in grads[1:])
    return {"fwd_bwd_s": min(times), "identical_gradients": same,
            "max_grad_diff": max((grads[0] - q).abs().max().item() for q in grads[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=65536)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="outputs/benchmarks")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    grid = HashGrid(12, 2, 15, 16, 256, generator=gen)
    x = torch.rand(args.points, 3, generator=gen)
    g = torch.randn(args.points, grid.output_dim, generator=gen)
    assert torch.equal(grid(x), encode_advanced_indexing(grid, x))
    res = {"points": args.points, "threads": args.threads, "load_avg_start": os.getloadavg(),
           "index_select": measure(grid, grid, x, g, args.repeats),
           "advanced_indexing": measure(lambda t: encode_advanced_indexing(grid, t), grid, x, g, args.repeats)}
    res["load_avg_end"] = os.getloadavg()
    res["cost_ratio"] = res["index_select"]["fwd_bwd_s"] / res["advanced_indexing"]["fwd_bwd_s"]
    out = Path(args.out)
    write_json(out / "hashgrid.json", res)
    lines = [f"Hash-grid forward+backward, {args.points} points, {args.threads} thread(s) (best of {args.repeats}):", "",
             "| gather | s | identical gradients | max diff |", "|---|---|---|---|"]
    lines += [f"| {k} | {res[k]['fwd_bwd_s']:.4f} | {res[k]['identical_gradients']} | {res[k]['max_grad_diff']:.2e} |"
              for k in ("index_select", "advanced_indexing")]
    lines += ["", f"index_select / advanced indexing time: {res['cost_ratio']:.2f}",
              f"load average start/end: {res['load_avg_start']} / {res['load_avg_end']}"]
    (out / "hashgrid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
