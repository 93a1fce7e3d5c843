"""File I/O used by every stage: atomic writes (temp file + rename), PNG/NPY/JSON, contact sheets."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; when the block succeeds it replaces ``path`` whole."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (torch.Tensor, np.ndarray)):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[H, W, C]`` float in [0, 1] (or uint8) -> uint8 array."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.dtype == np.uint8:
        return a
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | Path, image: torch.Tensor | np.ndarray) -> None:
    """Save ``[H, W]`` or ``[H, W, 3|4]`` float in [0, 1] or uint8 as PNG, atomically."""
    a = to_uint8(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    with atomic_path(path) as tmp:
        Image.fromarray(a).save(tmp, format="PNG")


def load_png(path: str | Path) -> torch.Tensor:
    """PNG -> float32 tensor ``[H, W, C]`` in [0, 1] (C = 1, 3 or 4)."""
    with Image.open(path) as im:
        a = np.asarray(im)
    if a.dtype == np.uint16 or a.dtype == np.int32:
        t = torch.from_numpy(a.astype(np.float32) / 65535.0)
    else:
        t = torch.from_numpy(a.astype(np.float32) / 255.0)
    return t[..., None] if t.ndim == 2 else t


def save_npy(path: str | Path, array: torch.Tensor | np.ndarray) -> None:
    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, a)


def rgba_on_white(rgba: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` straight-alpha RGBA in [0, 1] -> ``[..., 3]`` RGB composited on white."""
    return rgba[..., :3] * rgba[..., 3:4] + (1.0 - rgba[..., 3:4])


def contact_sheet(images: Sequence[torch.Tensor] | torch.Tensor, cols: int | None = None,
                  pad: int = 2) -> torch.Tensor:
    """Tile ``N`` images ``[H, W, 3|4]`` (RGBA composited on white) into one ``[H', W', 3]`` grid."""
    imgs = [rgba_on_white(im) if im.shape[-1] == 4 else im[..., :3] for im in images]
    n = len(imgs)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    h, w = imgs[0].shape[:2]
    sheet = torch.ones(rows * (h + pad) + pad, cols * (w + pad) + pad, 3)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y:y + h, x:x + w] = im[:h, :w].to(sheet.dtype)
    return sheet
