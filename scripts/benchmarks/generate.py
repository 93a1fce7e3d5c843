"""Per-stage time (and peak memory) of ``hi3d generate``.

CPU, tiny random weights built here (default):  python scripts/benchmarks/generate.py
Real weights on a GPU:                           python scripts/benchmarks/generate.py --weights W --device cuda
Writes ``OUT/generate.{json,md}``; per-stage numbers come from the run's ``run.json`` files. Ratios are
against stage 1, measured in the same run.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

from hi3d import cameras as C  # noqa: E402
from hi3d.config import load_config  # noqa: E402
from hi3d.data.real_objects import resolve_object  # noqa: E402
from hi3d.io import save_png, write_bytes, write_json  # noqa: E402
from hi3d.pipelines.generate import generate_one  # noqa: E402
from hi3d.pipelines.image_to_3d import GenerateConfig  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="real weights folder (default: tiny random weights)")
    p.add_argument("--image", help="input RGBA image (default: a render of the assimp spider)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="outputs/benchmarks")
    p.add_argument("overrides", nargs="*", help="GenerateConfig key=value")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="hi3d-generate-bench-"))
    weights = args.weights
    if weights is None:
        from hi3d.testing import save_tiny_weights

        weights = str(save_tiny_weights(work / "weights", text_to_image=False))
    image = args.image
    if image is None:
        from hi3d.data.render import render_views

        view = render_views(resolve_object("spider"),
                            C.orbit_c2w(torch.tensor([30.0]), torch.tensor([20.0])), C.intrinsics(256), 256, 256)
        image = work / "input.png"
        save_png(image, view.rgba[0])
    cfg = load_config(GenerateConfig, None, [f"weights={weights}", f"device={args.device}", *args.overrides])
    generate_one(cfg, work / "out", source=Path(image))
    run = json.loads((work / "out" / "run.json").read_text())
    recon = json.loads((work / "out" / "recon" / "run.json").read_text())
    stages = {k.split("/")[0]: v for k, v in run["stages"].items() if k != "hash_weights"}
    stages.update({f"  {k}": v for k, v in recon["stages"].items()})
    base = stages["stage1"]["wall_time_s"] or 1e-9
    rows = {k: {"wall_time_s": v["wall_time_s"], "x_stage1": round(v["wall_time_s"] / base, 2),
                "cpu_max_rss_mb": round(v.get("cpu_max_rss_mb", 0)), "cuda_peak_mb": round(v.get("cuda_peak_mb", 0))}
            for k, v in stages.items()}
    result = {"weights": "tiny random" if args.weights is None else weights, "device": args.device,
              "torch_threads": torch.get_num_threads(), "stages": rows}
    out = Path(args.out)
    write_json(out / "generate.json", result)
    md = ["| stage | wall s | × stage 1 | CPU max RSS MB | CUDA peak MB |", "|---|---|---|---|---|"]
    md += [f"| {k} | {v['wall_time_s']} | {v['x_stage1']} | {v['cpu_max_rss_mb']} | {v['cuda_peak_mb']} |"
           for k, v in rows.items()]
    write_bytes(out / "generate.md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
