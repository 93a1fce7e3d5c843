"""The orbit folder layout shared by the renderer, the 3DGS interpolator, NeuS, datasets and evaluation.

```
DIR/cameras.json        convention, width, height, normalization (4x4, source file -> world), frames[...]
DIR/rgba/000.png        straight-alpha RGBA; alpha is the object mask
DIR/depth/000.npy       float32 [H, W], camera-z depth in world units, 0 on background   (optional)
DIR/normal/000.png      world-space unit normals encoded (n + 1) / 2, RGBA with the same alpha (optional)
DIR/contact_sheet.png
```
Each ``frames`` entry: ``file``, ``depth`` and ``normal`` (relative paths or null), ``c2w`` (4x4,
OpenCV, see ``hi3d.cameras``), ``K`` (3x3 pixels), ``azimuth_deg``, ``elevation_deg``, ``radius``,
and ``source`` ("render", "interpolated", "generated", ...).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from hi3d import cameras
from hi3d.errors import Hi3DError
from hi3d.io import contact_sheet, load_png, read_json, save_npy, save_png, write_json


@dataclasses.dataclass
class Orbit:
    """Views of one object with exact cameras. N views of H x W pixels.

    rgba: ``[N, H, W, 4]`` float32 in [0, 1]; depth ``[N, H, W]`` float32 or None; normal
    ``[N, H, W, 3]`` float32 in [-1, 1] or None; c2w ``[N, 4, 4]`` and K ``[N, 3, 3]`` float64;
    azimuth_deg, elevation_deg, radius ``[N]`` float64; normalization ``[4, 4]`` float64 maps source
    file coordinates to the world (axis change and unit-cube normalisation).
    """

    rgba: torch.Tensor
    c2w: torch.Tensor
    K: torch.Tensor
    azimuth_deg: torch.Tensor
    elevation_deg: torch.Tensor
    radius: torch.Tensor
    normalization: torch.Tensor = dataclasses.field(default_factory=lambda: torch.eye(4, dtype=torch.float64))
    depth: torch.Tensor | None = None
    normal: torch.Tensor | None = None
    source: list[str] | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return self.rgba.shape[0]

    @property
    def height(self) -> int:
        return self.rgba.shape[1]

    @property
    def width(self) -> int:
        return self.rgba.shape[2]

    @property
    def mask(self) -> torch.Tensor:
        """``[N, H, W]`` bool, alpha > 0.5."""
        return self.rgba[..., 3] > 0.5

    def rgb_on_white(self) -> torch.Tensor:
        """``[N, H, W, 3]`` in [0, 1]."""
        return self.rgba[..., :3] * self.rgba[..., 3:] + (1 - self.rgba[..., 3:])

    def select(self, index) -> Orbit:
        """A sub-orbit of the views ``index`` (list, slice or tensor)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        idx = list(range(len(self)))[index] if isinstance(index, slice) else list(torch.as_tensor(index).tolist())
        return dataclasses.replace(
            self, rgba=pick(self.rgba), c2w=pick(self.c2w), K=pick(self.K), azimuth_deg=pick(self.azimuth_deg),
            elevation_deg=pick(self.elevation_deg), radius=pick(self.radius), depth=pick(self.depth),
            normal=pick(self.normal), source=None if self.source is None else [self.source[i] for i in idx])


def save_orbit(orbit: Orbit, out_dir: str | Path, sheet: bool = True, extra: dict | None = None) -> Path:
    """Write ``orbit`` in the layout above (each file atomically, ``cameras.json`` last)."""
    out = Path(out_dir)
    frames = []
    for i in range(len(orbit)):
        entry = {"file": f"rgba/{i:03d}.png", "depth": None, "normal": None}
        save_png(out / entry["file"], orbit.rgba[i])
        if orbit.depth is not None:
            entry["depth"] = f"depth/{i:03d}.npy"
            save_npy(out / entry["depth"], orbit.depth[i].float())
        if orbit.normal is not None:
            entry["normal"] = f"normal/{i:03d}.png"
            save_png(out / entry["normal"], torch.cat([(orbit.normal[i] + 1) / 2, orbit.rgba[i, ..., 3:]], -1))
        entry.update(c2w=orbit.c2w[i], K=orbit.K[i], azimuth_deg=float(orbit.azimuth_deg[i]),
                     elevation_deg=float(orbit.elevation_deg[i]), radius=float(orbit.radius[i]),
                     source=orbit.source[i] if orbit.source else "render")
        frames.append(entry)
    if sheet:
        save_png(out / "contact_sheet.png", contact_sheet(list(orbit.rgba), cols=min(8, len(orbit))))
    write_json(out / "cameras.json", {
        "convention": cameras.CONVENTION, "width": orbit.width, "height": orbit.height,
        "normalization": orbit.normalization, "meta": orbit.meta, **(extra or {}), "frames": frames})
    return out


def load_orbit(orbit_dir: str | Path, load_depth: bool = True, load_normal: bool = False) -> Orbit:
    """Read an orbit folder; clear ``Hi3DError`` for a missing ``cameras.json``, missing or mis-sized images."""
    root = Path(orbit_dir)
    meta_path = root / "cameras.json"
    if not meta_path.is_file():
        raise Hi3DError(f"{root}: no cameras.json (expected an orbit folder written by 'hi3d render-orbit')")
    try:
        meta = read_json(meta_path)
        frames = meta["frames"]
    except (ValueError, KeyError) as e:
        raise Hi3DError(f"{meta_path}: not a valid cameras.json ({e})") from None
    if meta.get("convention") != cameras.CONVENTION:
        raise Hi3DError(f"{meta_path}: camera convention '{meta.get('convention')}' is not '{cameras.CONVENTION}'")
    if not frames:
        raise Hi3DError(f"{meta_path}: lists no frames")
    rgba, depth, normal = [], [], []
    for f in frames:
        path = root / f["file"]
        if not path.is_file():
            raise Hi3DError(f"{root}: view image {f['file']} listed in cameras.json is missing")
        im = load_png(path)
        if im.shape[2] == 3:
            im = torch.cat([im, torch.ones_like(im[..., :1])], -1)
        if im.shape[:2] != (meta["height"], meta["width"]):
            raise Hi3DError(f"{path}: image is {im.shape[1]}x{im.shape[0]}, cameras.json says "
                            f"{meta['width']}x{meta['height']} (inconsistent image sizes)")
        rgba.append(im[..., :4])
        if load_depth and f.get("depth"):
            depth.append(torch.from_numpy(np.load(root / f["depth"])).float())
        if load_normal and f.get("normal"):
            normal.append(load_png(root / f["normal"])[..., :3] * 2 - 1)
    t = lambda key: torch.tensor([f[key] for f in frames], dtype=torch.float64)  # noqa: E731
    return Orbit(
        rgba=torch.stack(rgba), c2w=t("c2w"), K=t("K"), azimuth_deg=t("azimuth_deg"),
        elevation_deg=t("elevation_deg"), radius=t("radius"),
        normalization=torch.tensor(meta.get("normalization", np.eye(4).tolist()), dtype=torch.float64),
        depth=torch.stack(depth) if len(depth) == len(frames) else None,
        normal=torch.stack(normal) if len(normal) == len(frames) else None,
        source=[f.get("source", "render") for f in frames], meta=meta.get("meta", {}))


def concat_orbits(a: Orbit, b: Orbit) -> Orbit:
    """Views of ``a`` then ``b`` (same size and normalisation); depth/normal kept only if both have them."""
    if (a.height, a.width) != (b.height, b.width):
        raise Hi3DError(f"cannot join orbits of sizes {a.width}x{a.height} and {b.width}x{b.height}")
    cat = lambda x, y: None if x is None or y is None else torch.cat([x, y])  # noqa: E731
    return dataclasses.replace(
        a, rgba=cat(a.rgba, b.rgba), c2w=cat(a.c2w, b.c2w), K=cat(a.K, b.K),
        azimuth_deg=cat(a.azimuth_deg, b.azimuth_deg), elevation_deg=cat(a.elevation_deg, b.elevation_deg),
        radius=cat(a.radius, b.radius), depth=cat(a.depth, b.depth), normal=cat(a.normal, b.normal),
        source=(a.source or ["render"] * len(a)) + (b.source or ["render"] * len(b)))
