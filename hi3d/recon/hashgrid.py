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
        self.register_buffer("dense", torch.tensor([(r + 1) ** 3 <= self.table_size for r in res]),
                             persistent=False)
        table = torch.rand(offsets[-1], features_per_level, generator=generator) * 2 - 1
        self.table = nn.Parameter(table * init_scale)

    @property
    def output_dim(self) -> int:
        return self.num_levels * self.features_per_level

    def _index(self, base: torch.Tensor, levels: int) -> torch.Tensor:
        """Cell origins ``[N, levels, 3]`` (int32) -> table rows of the 8 corners ``[N, levels, 8]`` (int32,
        c = dx + 2dy + 4dz) of the first ``levels`` levels.

        Per-axis terms ``[N, l, 2]`` are combined by broadcasting straight into the output, so each product
        is computed once and no intermediate of the full size is made. The hash keeps the low
        ``log2_hashmap_size`` bits of every per-axis product before the xor (the low bits of a product
        depend only on the low bits of its factors), so no product overflows int32."""
        n = base.shape[0]
        nd = min(int(self.dense.sum()), levels)  # dense levels come first (resolution grows with the level)
        c = base[..., None] + torch.arange(2, dtype=base.dtype, device=base.device)  # [N, l, 3, 2]
        offsets = self.offsets[:levels].to(base.dtype).view(1, -1, 1)
        idx = torch.empty(n, levels, 2, 2, 2, dtype=base.dtype, device=base.device)  # [N, l, dz, dy, dx]
        if nd:
            s = (self.resolutions[:nd] + 1).to(base.dtype).view(1, -1, 1)
            x, y, z = c[:, :nd, 0], c[:, :nd, 1] * s, c[:, :nd, 2] * (s * s) + offsets[:, :nd]
            torch.add((z[..., :, None] + y[..., None, :])[..., None], x[..., None, None, :], out=idx[:, :nd])
        if nd < levels:
            mask = self.table_size - 1
            x, y, z = ((c[:, nd:, a] * (p & mask)) & mask for a, p in enumerate(PRIMES))
            hashed = idx[:, nd:]
            torch.bitwise_xor((z[..., :, None] ^ y[..., None, :])[..., None], x[..., None, None, :], out=hashed)
            hashed += offsets[:, nd:, :, None, None]
        return idx.view(n, levels, 8)

    def forward(self, x: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """``x [N, 3]`` in [0, 1] -> ``[N, L*F]``; only the first ``levels`` levels (default all) are looked
        up, the features of the others are zero (coarse-to-fine training)."""
        levels = self.num_levels if levels is None else max(0, min(int(levels), self.num_levels))
        x = x.clamp(0.0, 1.0)
        res = self.resolutions[:levels]
        pos = x[:, None, :] * res.to(x.dtype)[None, :, None]  # [N, l, 3]
        base = pos.detach().floor().clamp(max=res.view(1, -1, 1) - 1)
        frac = pos - base  # [N, l, 3], differentiable in x
        wx, wy, wz = torch.stack([1 - frac, frac], dim=-1).unbind(2)  # each [N, l, 2]
        w = (wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]).flatten(2)  # [N, l, 8]
        idx = self._index(base.int(), levels)  # [N, l, 8]
        # index_select, not table[idx]: the backward of advanced indexing (index_put_ with accumulate) adds
        # in a thread-dependent order on CPU, index_select's in a fixed one: bit-reproducible. int64 rows:
        # with int32 ones the CPU backward takes a serial index_add_ path (5x slower)
        feats = self.table.index_select(0, idx.flatten().long()).view(*idx.shape, -1)  # [N, l, 8, F]
        out = torch.einsum("nlc,nlcf->nlf", w, feats.to(x.dtype)).reshape(x.shape[0], -1)  # [N, l*F]
        if levels < self.num_levels:
            out = torch.cat([out, out.new_zeros(x.shape[0], (self.num_levels - levels) * self.features_per_level)], 1)
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
