"""``hi3d generate``: image(s) or a prompt -> 3D meshes, resumable, batch-sharded across accelerate processes.

    hi3d generate IMAGE|FOLDER|LIST.txt --out DIR --weights W [--elevation 20|auto] [--seed 0] [--num-seeds 1]
                  [--num-interp 16] [--stages stage1|stage2|interpolate|mesh] [key=value ...]
    hi3d generate --text "a wooden chair" --out DIR --weights W
    accelerate launch --num_processes 8 -m hi3d.cli generate FOLDER --out DIR --weights W

One input -> ``DIR`` (per-seed subfolders when ``--num-seeds > 1``); several -> ``DIR/<image stem>/``, with
``DIR/summary.md`` and ``summary.csv`` listing what succeeded and what failed (an input that fails is
reported, not fatal). Re-running skips finished inputs and resumes unfinished ones stage by stage.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import time
import traceback
from pathlib import Path

from hi3d.cli import add_config_args
from hi3d.config import load_config
from hi3d.errors import Hi3DError
from hi3d.io import read_json, write_bytes, write_json
from hi3d.pipelines.image_to_3d import GenerateConfig, ImageTo3D, input_rgba, prompt_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def list_inputs(source: str) -> list[Path]:
    """One image, every image in a folder (sorted), or the paths listed in a .txt file (one per line)."""
    path = Path(source)
    if path.is_dir():
        items = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not items:
            raise Hi3DError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return items
    if path.suffix.lower() == ".txt" and path.is_file():
        return [Path(line.strip()) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [path]


def _status_path(out: Path) -> Path:
    return out / "status.json"


def generate_one(cfg: GenerateConfig, out: Path, source: Path | None = None, prompt: str | None = None,
                 runner: ImageTo3D | None = None, process: int = 0) -> dict:
    """Run (or resume) one input on accelerate process ``process``; returns its status entry (also written to
    ``out/status.json``)."""
    from hi3d.provenance import RunRecord

    runner = runner or ImageTo3D(cfg)
    record = RunRecord(out, "generate", config=runner.cfg, seed=cfg.seed, device=runner.device)
    record.add(input=str(source) if source else None, prompt=prompt, devices=runner.devices)
    if runner.weights is not None and runner.weights.is_dir():
        with record.stage("hash_weights", "cpu"):
            record.add_weights(runner.weights)
    start = time.perf_counter()
    if prompt is not None:
        with record.stage("text_to_image"):
            rgba = prompt_image(prompt, cfg, runner._folder("text_to_image").parent, out, cfg.seed)
    else:
        rgba = input_rgba(source, cfg)
    elevation = runner.input_elevation(rgba, out, cfg.seed, record)
    outputs = {}
    for k in range(cfg.num_seeds):
        seed = cfg.seed + k
        seed_dir = out if cfg.num_seeds == 1 else out / f"seed_{seed}"
        outputs[seed] = {name: str(p) for name, p in runner.run(rgba, seed_dir, seed, record, elevation).items()}
    record.finish(outputs=outputs)
    status = {"input": str(source or prompt), "status": "ok", "stages": cfg.stages,
              "seconds": round(time.perf_counter() - start, 1), "error": "", "elevation": elevation["elevation"],
              "process": process}
    if elevation["mode"] == "auto":
        status.update(elevation_guess=elevation["guess"], elevation_estimate=elevation["estimate"])
    write_json(_status_path(out), status)
    return status


def write_summary(out: Path, items: list[tuple[str, Path]]) -> list[dict]:
    """``summary.md`` / ``summary.csv`` from each input's ``status.json``."""
    rows = []
    for name, folder in items:
        try:
            rows.append({"name": name, **read_json(_status_path(folder))})
        except (OSError, ValueError):
            rows.append({"name": name, "input": name, "status": "not run", "stages": "", "seconds": "", "error": ""})
    keys = ["name", "status", "seconds", "stages", "elevation", "process", "error", "input"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_bytes(out / "summary.csv", buf.getvalue().encode())
    ok = sum(r["status"] == "ok" for r in rows)
    md = [f"# hi3d generate: {ok}/{len(rows)} succeeded", "", "| " + " | ".join(keys) + " |",
          "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r.get(k, "")).replace("|", "/") for k in keys) + " |" for r in rows]
    write_bytes(out / "summary.md", ("\n".join(md) + "\n").encode())
    return rows


def run_batch(cfg: GenerateConfig, sources: list[Path], out: Path) -> list[dict]:
    """Each input to ``out/<stem>/``, inputs sharded over accelerate processes (``device=auto``: each on its
    own GPU, or gloo CPU processes without CUDA); failures recorded, not fatal."""
    import torch

    from hi3d.parallel import Shard

    shard = Shard(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    if cfg.device == "auto":
        cfg = dataclasses.replace(cfg, device=str(shard.device))
    names = [p.stem for p in sources]
    if len(set(names)) != len(names):
        raise Hi3DError("inputs with the same file name would share an output folder: rename them")
    runner = ImageTo3D(cfg)
    for i in shard.indices(len(sources)):
        name, src = names[i], sources[i]
        folder = out / name
        try:
            done = read_json(_status_path(folder)) if _status_path(folder).is_file() else None
        except ValueError:
            done = None
        if done and done.get("status") == "ok" and done.get("stages") == cfg.stages:
            continue
        try:
            generate_one(cfg, folder, source=src, runner=runner, process=shard.rank)
        except Exception as e:  # one bad input never stops the batch
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            shard.record(_status_path(folder), {"input": str(src), "status": "failed", "stages": cfg.stages,
                                                "seconds": "", "error": msg})
            if not isinstance(e, Hi3DError):
                write_bytes(folder / "error.log", traceback.format_exc().encode())
    shard.wait()
    return write_summary(out, list(zip(names, [out / n for n in names]))) if shard.is_main else []


def _elevation_flag(value: str) -> dict:
    """``--elevation``: degrees -> ``elevation=``, ``auto`` -> ``auto_elevation.enabled=true``."""
    if value.strip().lower() == "auto":
        return {"auto_elevation.enabled": "true"}
    try:
        deg = float(value)
    except ValueError:
        raise Hi3DError(f"--elevation must be a number of degrees or 'auto', got '{value}'") from None
    if not -90.0 < deg < 90.0:
        raise Hi3DError(f"--elevation {value}: must lie strictly between -90 and 90 degrees")
    return {"elevation": deg, "auto_elevation.enabled": "false"}


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hi3d generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="image, folder of images, or .txt list of image paths")
    p.add_argument("--text", help="prompt: text -> image -> 3D (needs WEIGHTS/text_to_image)")
    p.add_argument("--out", required=True)
    p.add_argument("--weights", help="weights folder (see `hi3d check-weights`)")
    p.add_argument("--elevation", metavar="DEG|auto", help="elevation of the input view in degrees (default 20), or 'auto': "
                   "estimate it "
                   "from a stage-1 probe orbit at auto_elevation.guess (hi3d.pipelines.elevation)")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-seeds", type=int)
    p.add_argument("--num-interp", type=int)
    p.add_argument("--stages", help="stop after: stage1 | stage2 | interpolate | mesh")
    add_config_args(p)
    args = p.parse_intermixed_args(argv)
    if args.text is not None and args.input and "=" in args.input and not Path(args.input).exists():
        args.overrides.insert(0, args.input)  # with --text the first key=value lands in the input slot
        args.input = None
    if (args.input is None) == (args.text is None):
        raise Hi3DError("give either an input image/folder/list or --text \"prompt\"")
    flags = {"weights": args.weights, "seed": args.seed, "num_seeds": args.num_seeds,
             "num_interp": args.num_interp, "stages": args.stages}
    if args.elevation is not None:
        flags.update(_elevation_flag(args.elevation))
    cfg = load_config(GenerateConfig, args.config,
                      list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None])
    out = Path(args.out)
    if args.text is not None:
        status = generate_one(cfg, out, prompt=args.text)
        print(f"done: {out} ({status['seconds']} s)")
        return 0
    sources = list_inputs(args.input)
    if len(sources) == 1 and not Path(args.input).is_dir() and Path(args.input).suffix.lower() != ".txt":
        status = generate_one(cfg, out, source=sources[0])
        print(f"done: {out} ({status['seconds']} s)")
        return 0
    rows = run_batch(cfg, sources, out)
    if rows:
        failed = [r for r in rows if r["status"] != "ok"]
        print(f"{len(rows) - len(failed)}/{len(rows)} succeeded; summary: {out / 'summary.md'}")
        return 1 if failed else 0
    return 0
