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

    def _index(self, base: torch.Tensor) -> torch.Tensor:
        """Cell origins ``[N, L, 3]`` (int64) -> table rows of the 8 corners ``[N, L, 8]`` (c = dx + 2dy + 4dz).

        Per-axis terms ``[N, L, 2]`` are combined by broadcasting, so each product is computed once."""
        nd = int(self.dense.sum())  # dense levels come first (resolution grows with the level)
        c = base[..., None] + torch.arange(2, device=base.device)  # [N, L, 3, 2]
        parts = []
        if nd:
            s = (self.resolutions[:nd] + 1).view(1, -1, 1)
            x, y, z = c[:, :nd, 0], c[:, :nd, 1] * s, c[:, :nd, 2] * s * s
            parts.append(z[..., :, None, None] + y[..., None, :, None] + x[..., None, None, :])
        if nd < self.num_levels:
            x, y, z = c[:, nd:, 0] * PRIMES[0], c[:, nd:, 1] * PRIMES[1], c[:, nd:, 2] * PRIMES[2]
            h = z[..., :, None, None] ^ y[..., None, :, None] ^ x[..., None, None, :]
            parts.append(h & (self.table_size - 1))
        idx = torch.cat(parts, dim=1).flatten(2)  # [N, L, 8]
        return idx + self.offsets.view(1, -1, 1)

    def forward(self, x: torch.Tensor, level_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [N, 3]`` in [0, 1] -> ``[N, L*F]``; ``level_mask [L]`` (0/1) zeroes disabled levels."""
        x = x.clamp(0.0, 1.0)
        pos = x[:, None, :] * self.resolutions.to(x.dtype)[None, :, None]  # [N, L, 3]
        base = pos.detach().floor().clamp(max=self.resolutions.view(1, -1, 1) - 1)
        frac = pos - base  # [N, L, 3], differentiable in x
        wx, wy, wz = torch.stack([1 - frac, frac], dim=-1).unbind(2)  # each [N, L, 2]
        w = (wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]).flatten(2)  # [N, L, 8]
        idx = self._index(base.long())  # [N, L, 8]
        # index_select, not table[idx]: the backward of advanced indexing (index_put_ with accumulate) adds
        # in a thread-dependent order on CPU, index_select's (index_add_) in a fixed one: bit-reproducible
        feats = self.table.index_select(0, idx.flatten()).view(*idx.shape, -1)  # [N, L, 8, F]
        out = torch.einsum("nlc,nlcf->nlf", w, feats.to(x.dtype))  # [N, L, F]
        if level_mask is not None:
            out = out * level_mask.to(out)[None, :, None]
        return out.reshape(x.shape[0], -1)


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
