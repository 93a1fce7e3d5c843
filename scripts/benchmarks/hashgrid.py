"""Hash-grid encoding speed and reproducibility (run by hand): forward, forward + backward (table) and the
eikonal double backward of the NeuS CPU config's encoding (12 levels x 2 features, 2^15 rows, 256 max
resolution) on ``--points`` points, for

- ``HashGrid.forward``: ``[corner, level, point]`` layout, one 1-D ``index_select`` per feature;
- ``point_major``: the previous layout ``[point, level, corner, feature]`` (int64 rows, ``index_select``,
  einsum over the corners), written out here as the baseline;
- ``advanced_indexing``: ``point_major`` gathering by ``table[idx]`` (backward: ``index_put_`` with
  accumulate, a thread-dependent order on CPU).

Each is checked against ``HashGrid.forward`` and for identical gradients over repeated backwards.

    .venv/bin/python scripts/benchmarks/hashgrid.py [--points 32768] [--threads 2] [--repeats 5] [--out DIR]

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
from hi3d.recon.hashgrid import PRIMES, HashGrid  # noqa: E402


def encode_point_major(grid: HashGrid, x: torch.Tensor, advanced_indexing: bool = False) -> torch.Tensor:
    """The previous ``HashGrid.forward``: ``[N, L, 8]`` int64 corner rows, gather, einsum over the corners."""
    x = x.clamp(0.0, 1.0)
    pos = x[:, None, :] * grid.resolutions.to(x.dtype)[None, :, None]
    base = pos.detach().floor().clamp(max=grid.resolutions.view(1, -1, 1) - 1)
    frac = pos - base
    wx, wy, wz = torch.stack([1 - frac, frac], dim=-1).unbind(2)
    w = (wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]).flatten(2)  # [N, L, 8]
    c = base.long()[..., None] + torch.arange(2)  # [N, L, 3, 2]
    nd, parts = int(grid.dense.sum()), []
    s = (grid.resolutions[:nd] + 1).view(1, -1, 1)
    xs, ys, zs = c[:, :nd, 0], c[:, :nd, 1] * s, c[:, :nd, 2] * s * s
    parts.append(zs[..., :, None, None] + ys[..., None, :, None] + xs[..., None, None, :])
    xs, ys, zs = (c[:, nd:, a] * p for a, p in enumerate(PRIMES))
    parts.append((zs[..., :, None, None] ^ ys[..., None, :, None] ^ xs[..., None, None, :]) & (grid.table_size - 1))
    idx = torch.cat(parts, dim=1).flatten(2) + grid.offsets.view(1, -1, 1)
    feats = grid.table[idx] if advanced_indexing else grid.table.index_select(0, idx.flatten()).view(*idx.shape, -1)
    return torch.einsum("nlc,nlcf->nlf", w, feats.to(x.dtype)).reshape(x.shape[0], -1)


def measure(fn, grid, x, g, repeats):
    def forward():
        with torch.no_grad():
            fn(x)

    def backward():
        grid.table.grad = None
        (fn(x) * g).sum().backward()
        return grid.table.grad.clone()

    def eikonal():
        grid.table.grad = None
        xx = x.clone().requires_grad_(True)
        gx, = torch.autograd.grad((fn(xx) * g).sum(), xx, create_graph=True)
        gx.pow(2).sum().backward()
        return grid.table.grad.clone()

    out = {}
    for name, f in (("fwd_s", forward), ("fwd_bwd_s", backward), ("eikonal_s", eikonal)):
        times, grads = [], []
        for i in range(repeats + 1):
            t = time.perf_counter()
            r = f()
            if i:  # first call: warm-up
                times.append(time.perf_counter() - t)
            grads.append(r)
        out[name] = min(times)
        if grads[0] is not None:
            out[name.replace("_s", "_identical_gradients")] = all(torch.equal(grads[0], q) for q in grads[1:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", type=int, default=32768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="outputs/benchmarks")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    grid = HashGrid(12, 2, 15, 16, 256, init_scale=1.0, generator=gen)
    x = torch.rand(args.points, 3, generator=gen)
    g = torch.randn(args.points, grid.output_dim, generator=gen)
    paths = {"corner_major": grid, "point_major": lambda t: encode_point_major(grid, t),
             "advanced_indexing": lambda t: encode_point_major(grid, t, advanced_indexing=True)}
    for name, fn in paths.items():
        torch.testing.assert_close(fn(x), grid(x), rtol=0, atol=1e-6, msg=f"{name} differs from HashGrid.forward")
    res = {"points": args.points, "threads": args.threads, "load_avg_start": os.getloadavg()}
    res.update({name: measure(fn, grid, x, g, args.repeats) for name, fn in paths.items()})
    res["load_avg_end"] = os.getloadavg()
    base = res["point_major"]
    res["speedup_vs_point_major"] = {k: base[k] / res["corner_major"][k] for k in ("fwd_s", "fwd_bwd_s", "eikonal_s")}
    out = Path(args.out)
    write_json(out / "hashgrid.json", res)
    lines = [f"Hash-grid encoding, {args.points} points, {args.threads} thread(s) (best of {args.repeats}), seconds:", "",
             "| path | forward | fwd + bwd | eikonal (double bwd) | identical gradients (bwd / eikonal) |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {res[k]['fwd_s']:.4f} | {res[k]['fwd_bwd_s']:.4f} | {res[k]['eikonal_s']:.4f} | "
              f"{res[k]['fwd_bwd_identical_gradients']} / {res[k]['eikonal_identical_gradients']} |" for k in paths]
    sp = res["speedup_vs_point_major"]
    lines += ["", f"corner_major speed-up over point_major: forward {sp['fwd_s']:.2f}x, fwd + bwd {sp['fwd_bwd_s']:.2f}x, "
              f"eikonal {sp['eikonal_s']:.2f}x", f"load average start/end: {res['load_avg_start']} / {res['load_avg_end']}"]
    (out / "hashgrid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
