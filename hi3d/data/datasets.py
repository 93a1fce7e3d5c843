"""Orbit training data for the diffusion stages: orbit folders or tar shards -> fixed-size video samples.

One sample (``default_collate`` stacks them into the training batch)::

    frames     [F, 3, R, R] float32 in [-1, 1], RGB composited on white; frame 0 is the input view
    elevation  []           float32 degrees (of frame 0; renders use one elevation per orbit)
    azimuth    [F]          float32 degrees relative to frame 0 (frame 0 = 0, increasing along the orbit)
    c2w        [F, 4, 4]    float32 OpenCV camera-to-world (``hi3d.cameras``)
    object_id  str

Frame choice: an orbit of N views (N a multiple of F) gives F views ``(k + i * N / F) % N`` (i = 0..F-1),
i.e. evenly spaced and in orbit order. With ``rotate`` the start view k is drawn per (object, epoch) from
the seed (any of the N views may become the input view — the orbit stays an even, ordered orbit, only
its azimuth origin moves); without it k = 0. Images are resized (antialiased bilinear) so the shorter
side is R, then centre-cropped to R x R.

Two sources, same samples (tested bit-for-bit):
- ``OrbitDataset``: a folder holding orbit folders (``hi3d.data.orbit`` layout, found recursively).
- ``ShardOrbitDataset``: webdataset-style tar shards written by ``scripts/make_shards.py``. One sample =
  one object = consecutive members ``<key>.json`` (its ``cameras.json`` plus ``object_id``) and
  ``<key>.000.png`` ... (the orbit's RGBA PNGs, byte-for-byte). Shards are split across processes and
  dataloader workers, read sequentially, shuffled through a seeded buffer, and the stream can restart
  at a given batch position (``set_position``).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from hi3d.data.orbit import load_orbit
from hi3d.errors import Hi3DError
from hi3d.io import load_png, rgba_on_white


@dataclasses.dataclass
class DataConfig:
    root: str = ""
    """Folder of orbit folders, or of ``*.tar`` shards (``format``)."""
    format: str = "auto"
    """``folders``, ``shards`` or ``auto`` (shards if ``root`` holds ``*.tar`` files)."""
    resolution: int = 512
    num_frames: int = 16
    rotate: bool = False
    """Augmentation (not in the paper, whose input is the first rendered view): draw which orbit view is
    frame 0 (seeded, per object and epoch); the orbit order and even spacing are kept."""
    seed: int = 0
    shuffle_buffer: int = 64
    """Shards only: size of the seeded shuffle buffer (objects)."""


def seed_of(*parts) -> int:
    """A stable 63-bit seed from ``parts`` (Python's ``hash`` is salted per process, this is not)."""
    text = "/".join(map(str, parts)).encode()
    return (zlib.crc32(text) << 31) ^ zlib.crc32(text[::-1])


def frame_indices(num_views: int, num_frames: int, start: int = 0) -> list[int]:
    """Indices of ``num_frames`` evenly spaced views of an ``num_views`` orbit, starting at ``start``."""
    if num_views % num_frames:
        raise Hi3DError(f"an orbit of {num_views} views cannot give {num_frames} evenly spaced frames "
                        f"(render a multiple of {num_frames} views or change data.num_frames)")
    stride = num_views // num_frames
    return [(start + i * stride) % num_views for i in range(num_frames)]


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, size, size]``: shorter side to ``size`` (antialiased), centre crop."""
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        images = F.interpolate(images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        images = images[..., top:top + size, left:left + size]
    return images


def make_sample(rgba: torch.Tensor, frames_meta: list[dict], object_id: str, cfg: DataConfig,
                epoch: int) -> dict:
    """One training sample (module docstring) from an orbit's ``rgba [N, H, W, 4]`` in [0, 1] and its
    ``cameras.json`` frame entries; the rotation is drawn from ``(cfg.seed, epoch, object_id)``."""
    n = rgba.shape[0]
    start = 0
    if cfg.rotate:
        g = torch.Generator().manual_seed(seed_of(cfg.seed, epoch, object_id))
        start = int(torch.randint(n, (), generator=g))
    idx = frame_indices(n, cfg.num_frames, start)
    rgb = rgba_on_white(rgba[idx]).permute(0, 3, 1, 2).contiguous()
    rgb = resize_center_crop(rgb, cfg.resolution).clamp(0, 1)
    az = torch.tensor([frames_meta[i]["azimuth_deg"] for i in idx], dtype=torch.float64)
    return {
        "frames": rgb * 2 - 1,
        "elevation": torch.tensor(float(frames_meta[idx[0]]["elevation_deg"]), dtype=torch.float32),
        "azimuth": ((az - az[0]) % 360.0).float(),
        "c2w": torch.tensor([frames_meta[i]["c2w"] for i in idx], dtype=torch.float32),
        "object_id": object_id,
    }


def data_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise Hi3DError("data.root is not set (give data.root=FOLDER of rendered orbits or tar shards)")
    return Path(cfg.root)


def find_orbits(root: str | Path) -> list[Path]:
    """Orbit folders (holding ``cameras.json``) under ``root``, sorted; clear error if none."""
    root = Path(root)
    if not root.is_dir():
        raise Hi3DError(f"data root {root} is not a folder (set data.root to a folder of rendered orbits)")
    found = sorted(p.parent for p in root.rglob("cameras.json"))
    if not found:
        raise Hi3DError(f"no orbit folders (cameras.json) under {root}; render some with 'hi3d render-orbit'")
    return found


class OrbitDataset(Dataset):
    """Map-style dataset over orbit folders. ``dataset[i]`` is object ``i % len``; the epoch
    ``i // len`` picks its augmentation, so a sampler can ask for any (object, epoch) pair."""

    def __init__(self, cfg: DataConfig, folders: list[Path] | None = None):
        self.cfg = cfg
        root = data_root(cfg) if folders is None else Path(cfg.root)
        self.folders = folders if folders is not None else find_orbits(root)
        self.ids = [object_id(p, root) for p in self.folders]

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, key: int) -> dict:
        epoch, i = divmod(int(key), len(self))
        orbit = load_orbit(self.folders[i], load_depth=False)
        meta = json.loads((self.folders[i] / "cameras.json").read_text())
        return make_sample(orbit.rgba, meta["frames"], self.ids[i], self.cfg, epoch)


def object_id(folder: Path, root: Path) -> str:
    try:
        rel = folder.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = folder.name
    return rel if rel != "." else folder.name


def shard_key(obj_id: str) -> str:
    """Tar member key of an object: no dots or slashes (webdataset splits names at the first dot)."""
    return obj_id.replace("/", "__").replace(".", "_")


def write_shard(path: str | Path, folders: list[Path], root: Path) -> int:
    """Write one tar shard holding the orbit ``folders`` (module docstring format); returns its size."""
    with tarfile.open(path, "w") as tar:
        for folder in folders:
            meta = json.loads((folder / "cameras.json").read_text())
            oid = object_id(folder, root)
            key = shard_key(oid)
            members = [(f"{key}.json", json.dumps({**meta, "object_id": oid}).encode())]
            for i, f in enumerate(meta["frames"]):
                src = folder / f["file"]
                if not src.is_file():
                    raise Hi3DError(f"{folder}: view image {f['file']} listed in cameras.json is missing")
                members.append((f"{key}.{i:03d}.png", src.read_bytes()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return len(folders)


def read_shard(path: Path) -> Iterator[tuple[dict, list[bytes]]]:
    """Yield ``(meta, [png bytes per view])`` for each object of a shard, in file order."""
    meta, pngs = None, []
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".json"):
                    if meta is not None:
                        yield meta, pngs
                    meta, pngs = json.loads(data), []
                else:
                    pngs.append(data)
    except (tarfile.TarError, OSError, ValueError) as e:
        raise Hi3DError(f"cannot read shard {path}: {e} (re-create it with scripts/make_shards.py)") from None
    if meta is not None:
        yield meta, pngs


def decode_sample(meta: dict, pngs: list[bytes], cfg: DataConfig, epoch: int) -> dict:
    rgba = []
    for data in pngs:
        im = load_png(io.BytesIO(data))
        rgba.append(im if im.shape[2] == 4 else torch.cat([im, torch.ones_like(im[..., :1])], -1))
    return make_sample(torch.stack(rgba), meta["frames"], meta["object_id"], cfg, epoch)


class ShardOrbitDataset(IterableDataset):
    """Endless stream of samples from tar shards, split across processes and dataloader workers.

    Slot ``s = rank * workers + worker`` of ``S`` slots reads, in epoch ``e``, shards ``perm_e[s::S]``
    (``perm_e`` a seeded permutation), or, with fewer shards than slots, every ``S``-th object of all
    shards. Objects pass a seeded shuffle buffer. ``set_position(batches, batch_size)`` makes the stream
    of this process start after ``batches`` batches (a ``DataLoader`` takes batch ``j`` from worker
    ``j % workers``, so worker roles are rotated to continue the round robin); resuming needs the same
    number of processes and workers.
    """

    def __init__(self, cfg: DataConfig, shards: list[Path] | None = None):
        self.cfg = cfg
        self.shards = shards if shards is not None else sorted(data_root(cfg).glob("*.tar"))
        if not self.shards:
            raise Hi3DError(f"no *.tar shards in {cfg.root}; write them with scripts/make_shards.py")
        self.rank, self.world = 0, 1
        self.batches_done, self.batch_size = 0, 1

    def set_distributed(self, rank: int, world_size: int) -> None:
        self.rank, self.world = rank, world_size

    def set_position(self, batches_done: int, batch_size: int) -> None:
        self.batches_done, self.batch_size = batches_done, batch_size

    def _raw(self, epoch: int, slot: int, slots: int) -> Iterator[tuple[dict, list[bytes]]]:
        g = torch.Generator().manual_seed(seed_of(self.cfg.seed, "shards", epoch))
        order = [self.shards[i] for i in torch.randperm(len(self.shards), generator=g).tolist()]
        if len(order) >= slots:
            for path in order[slot::slots]:
                yield from read_shard(path)
        else:
            for j, item in enumerate(itertools.chain.from_iterable(read_shard(p) for p in order)):
                if j % slots == slot:
                    yield item

    def _shuffled(self, epoch: int, slot: int, slots: int) -> Iterator[tuple[dict, list[bytes]]]:
        g = torch.Generator().manual_seed(seed_of(self.cfg.seed, "buffer", epoch, slot, slots))
        buf: list = []
        for item in self._raw(epoch, slot, slots):
            if len(buf) < self.cfg.shuffle_buffer:
                buf.append(item)
                continue
            j = int(torch.randint(len(buf), (), generator=g))
            yield buf[j]
            buf[j] = item
        while buf:
            yield buf.pop(int(torch.randint(len(buf), (), generator=g)))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker + self.batches_done) % workers  # a new loader starts at worker 0: rotate roles
        slot, slots = self.rank * workers + worker, self.world * workers
        my_batches = self.batches_done // workers + (worker < self.batches_done % workers)
        skip = my_batches * self.batch_size
        for epoch in itertools.count():
            count = 0
            for meta, pngs in self._shuffled(epoch, slot, slots):
                count += 1
                if skip > 0:  # resume: pass over consumed objects without decoding them
                    skip -= 1
                    continue
                yield decode_sample(meta, pngs, self.cfg, epoch)
            if count == 0:
                raise Hi3DError(f"shard slot {slot} of {slots} (processes x dataloader workers) got no objects: "
                                f"{len(self.shards)} shards hold too few; use fewer workers or more objects")


def build_dataset(cfg: DataConfig) -> OrbitDataset | ShardOrbitDataset:
    """The dataset ``cfg.format`` names (``auto``: shards if ``cfg.root`` holds ``*.tar`` files)."""
    fmt = cfg.format
    data_root(cfg)
    if fmt == "auto":
        fmt = "shards" if Path(cfg.root).is_dir() and any(Path(cfg.root).glob("*.tar")) else "folders"
    if fmt == "folders":
        return OrbitDataset(cfg)
    if fmt == "shards":
        return ShardOrbitDataset(cfg)
    raise Hi3DError(f"data.format '{cfg.format}' is not one of folders, shards, auto")


def first_samples(dataset: OrbitDataset | ShardOrbitDataset, n: int) -> dict:
    """A fixed batch of the first ``n`` objects without rotation (validation conditions and targets)."""
    cfg = dataclasses.replace(dataset.cfg, rotate=False)
    if isinstance(dataset, OrbitDataset):
        items = [OrbitDataset(cfg, dataset.folders)[i] for i in range(min(n, len(dataset)))]
    else:
        raw = itertools.islice(itertools.chain.from_iterable(read_shard(p) for p in dataset.shards), n)
        items = [decode_sample(meta, pngs, cfg, 0) for meta, pngs in raw]
    return torch.utils.data.default_collate(items)
