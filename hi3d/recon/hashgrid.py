"""Multiresolution hash-grid encoding (Müller et al. 2022, Instant-NGP) in plain torch.

Level l has resolution ``R_l = floor(base_resolution * per_level_scale**l)`` cells per axis, i.e.
``R_l + 1`` vertices per axis. Coarse levels whose ``(R_l + 1)**3`` vertices fit in the table use a dense
index ``i + j (R+1) + k (R+1)^2``; finer levels use the spatial hash ``(i * 1) ^ (j * 2654435761) ^
(k * 805459861) mod T``. Features of the 8 cell corners are blended trilinearly, so the encoding is
continuous and differentiable in the position (needed for SDF normals and the eikonal loss).

``HashGrid.forward`` is the vectorised path (all levels and corners at once); ``reference_encode``
evaluates the same parameters level by level and corner by corner, and is what tests compare against.
tiny-cuda-nn is not used: the torch path is the only backend (it runs on CPU and GPU).
"""

from __future__ import annotations

import math

import torch
from torch import nn

PRIMES = (1, 2654435761, 805459861)


class HashGrid(nn.Module):
    """Encode points ``x [N, 3]`` in ``[0, 1]^3`` to features ``[N, num_levels * features_per_level]``."""

    def __init__(self, num_levels: int = 12, features_per_level: int = 2, log2_hashmap_size: int = 15,
                 base_resolution: int = 16, max_resolution: int = 512, init_scale: float = 1e-4,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.num_levels, self.features_per_level = num_levels, features_per_level
        self.table_size = 2 ** log2_hashmap_size
        scale = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(num_levels - 1, 1))
        res = [int(math.floor(base_resolution * scale ** lvl)) for lvl in range(num_levels)]
        sizes = [min((r + 1) ** 3, self.table_size) for r in res]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        self.register_buffer("resolutions", torch.tensor(res, dtype=torch.int64), persistent=False)
        self.register_buffer("sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets[:-1], dtype=torch.int64), persistent=False)
        # int32 corner rows unless a per-axis hash product (coordinate x masked prime) could overflow it
        self.index_dtype = torch.int32 if (max(res) + 2) * self.table_size < 2 ** 31 else torch.int64
        self.register_buffer("dense", torch.tensor([(r + 1) ** 3 <= self.table_size for r in res]),
                             persistent=False)
        table = torch.rand(offsets[-1], features_per_level, generator=generator) * 2 - 1
        self.table = nn.Parameter(table * init_scale)

    @property
    def output_dim(self) -> int:
        return self.num_levels * self.features_per_level

    def _index(self, base: torch.Tensor, levels: int) -> torch.Tensor:
        """Cell origins ``[levels, 3, N]`` (int32) -> table rows ``[2, 2, 2, levels, N]`` (int32; corner
        (dz, dy, dx)) of the first ``levels`` levels.

        The point axis is innermost, so every op runs along long contiguous rows; per-axis terms are
        combined by broadcasting straight into the output. The hash keeps the low ``log2_hashmap_size``
        bits of each per-axis product before the xor (the low bits of a product depend only on the low
        bits of its factors), so no product overflows int32 (int64 for tables and resolutions too large for that)."""
        n = base.shape[-1]
        nd = min(int(self.dense.sum()), levels)  # dense levels come first (resolution grows with the level)
        c = base[None] + torch.arange(2, dtype=base.dtype, device=base.device).view(2, 1, 1, 1)  # [2, l, 3, N]
        offsets = self.offsets[:levels].to(base.dtype).view(-1, 1)
        idx = torch.empty(2, 2, 2, levels, n, dtype=base.dtype, device=base.device)
        if nd:
            s = (self.resolutions[:nd] + 1).to(base.dtype).view(-1, 1)
            x, y, z = c[:, :nd, 0], c[:, :nd, 1] * s, c[:, :nd, 2] * (s * s) + offsets[:nd]
            torch.add((z[:, None] + y[None])[:, :, None], x[None, None], out=idx[:, :, :, :nd])
        if nd < levels:
            mask = self.table_size - 1
            x, y, z = ((c[:, nd:, a] * (p & mask)) & mask for a, p in enumerate(PRIMES))
            hashed = idx[:, :, :, nd:]
            torch.bitwise_xor((z[:, None] ^ y[None])[:, :, None], x[None, None], out=hashed)
            hashed += offsets[nd:]
        return idx

    def forward(self, x: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """``x [N, 3]`` in [0, 1] -> ``[N, L*F]``; only the first ``levels`` levels (default all) are looked
        up, the features of the others are zero (coarse-to-fine training).

        Layout ``[corner, level, point]`` throughout and one 1-D gather per feature, so no op has a short
        inner loop (2.6x the speed of ``[point, level, corner, feature]`` forward + backward on a CPU,
        ``scripts/benchmarks/hashgrid.py``)."""
        levels = self.num_levels if levels is None else max(0, min(int(levels), self.num_levels))
        n = x.shape[0]
        if levels == 0:
            return x.new_zeros(n, self.output_dim)
        res = self.resolutions[:levels]
        pos = x.clamp(0.0, 1.0).T[None] * res.to(x.dtype).view(-1, 1, 1)  # [l, 3, N]
        base = pos.detach().floor().clamp(max=res.view(-1, 1, 1) - 1)
        t = torch.stack([1 - (pos - base), pos - base])  # [2, l, 3, N] trilinear factors, differentiable in x
        w = (t[:, None, None, :, 2] * t[None, :, None, :, 1] * t[None, None, :, :, 0]).view(8, -1)  # [8, l*N]
        rows = self._index(base.to(self.index_dtype), levels).view(-1)  # [8*l*N]
        # index_select, not table[idx]: the backward of advanced indexing (index_put_ with accumulate) adds
        # in a thread-dependent order on CPU, index_select's (index_add_) in a fixed one: bit-reproducible
        table = self.table.T.to(x.dtype).contiguous()  # [F, rows]
        out = torch.stack([(w * f.index_select(0, rows).view(8, -1)).sum(0) for f in table])  # [F, l*N]
        out = out.view(-1, levels, n).permute(2, 1, 0).reshape(n, -1)  # [N, l*F]
        if levels < self.num_levels:
            out = torch.cat([out, out.new_zeros(n, (self.num_levels - levels) * self.features_per_level)], 1)
        return out


def reference_encode(grid: HashGrid, x: torch.Tensor) -> torch.Tensor:
    """Direct evaluation of ``grid`` at ``x [N, 3]``: one level and one corner at a time (slow, for tests)."""
    x = x.clamp(0.0, 1.0)
    levels = []
    for lvl in range(grid.num_levels):
        res = int(grid.resolutions[lvl])
        table = grid.table[int(grid.offsets[lvl]):int(grid.offsets[lvl]) + int(grid.sizes[lvl])]
        pos = x * res
        cell = pos.detach().floor().clamp(max=res - 1)
        t = pos - cell
        acc = torch.zeros(x.shape[0], grid.features_per_level, dtype=x.dtype)
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    i, j, k = (cell[:, 0].long() + dx, cell[:, 1].long() + dy, cell[:, 2].long() + dz)
                    if (res + 1) ** 3 <= grid.table_size:
                        row = i + j * (res + 1) + k * (res + 1) ** 2
                    else:
                        row = (i * PRIMES[0] ^ j * PRIMES[1] ^ k * PRIMES[2]) % table.shape[0]
                    wx = t[:, 0] if dx else 1 - t[:, 0]
                    wy = t[:, 1] if dy else 1 - t[:, 1]
                    wz = t[:, 2] if dz else 1 - t[:, 2]
                    acc = acc + (wx * wy * wz)[:, None] * table[row].to(x.dtype)
        levels.append(acc)
    return torch.cat(levels, dim=1)
