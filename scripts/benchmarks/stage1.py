#!/usr/bin/env python
"""Stage-1 model benchmark, run by hand: tiny-config sampling speed on this machine, and the paper-size model's
size, memory and compute estimated from meta-device construction (no weights needed).

    python scripts/benchmarks/stage1.py [--config configs/stage1/tiny_cpu.yaml] [--repeats 2] [--threads N]
        [--out outputs/benchmarks]

Sampling (tiny ``model:`` section of ``--config``, CPU): seconds per video with the paper's sampler settings
(25 Euler steps, CFG 1.0 -> 2.5) and without guidance; baseline measured in the same run: one UNet forward
for one video — the ratios say how many UNet-forward equivalents a video costs.
Paper model (``configs/stage1/*.json``, 16 frames at 512²): parameter counts, weight memory per dtype, the
full fine-tuning state (fp32 weights + grads + AdamW moments + EMA), FLOPs of one UNet forward and an upper
bound of its activation memory (sum of all intermediate tensors, i.e. training without gradient
checkpointing), both counted by running the UNet on the meta device.
Writes ``stage1.json`` and ``stage1.md`` under ``--out``; other sections (training steps/s) add their keys.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from hi3d.config import load_config
from hi3d.io import read_json, write_bytes, write_json
from hi3d.models.conditioning import added_time_ids
from hi3d.models.convert import build_modules, default_config_dir
from hi3d.models.stage1 import Stage1Config, tiny_components
from hi3d.models.svd import unet_forward
from hi3d.pipelines.orbit import OrbitPipeline


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def model_config(path: str | None) -> Stage1Config:
    """The ``model:`` section of a training config (or the file itself if it has none), tiny forced on."""
    from omegaconf import OmegaConf

    overrides = ["tiny.enabled=true"]
    if path is None:
        return load_config(Stage1Config, None, overrides)
    raw = OmegaConf.load(path)
    section = raw.get("model", raw)
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "stage1_bench_model.yaml"
    OmegaConf.save(section, tmp)
    return load_config(Stage1Config, tmp, overrides)


@torch.no_grad()
def sampling(cfg: Stage1Config, repeats: int, steps: int) -> dict:
    comps = tiny_components(cfg)
    pipe = OrbitPipeline.from_components(comps, cfg)
    image = torch.ones(cfg.resolution, cfg.resolution, 4)
    r = cfg.resolution
    image[r // 4: 3 * r // 4, r // 3: 2 * r // 3, :3] = torch.tensor([0.8, 0.3, 0.1])
    f = 2 ** (len(comps.vae.config.block_out_channels) - 1)
    x = torch.randn(1, cfg.num_frames, 4, r // f, r // f)
    clip = torch.zeros(1, 1, comps.unet.config.cross_attention_dim)
    ids = added_time_ids(cfg.slots, torch.tensor([20.0]), torch.tensor([0.02]))
    unet_call = lambda: unet_forward(comps.unet, x, torch.tensor([0.5]), x, clip, ids)
    unet_call()  # warm-up
    t_unet = best_of(unet_call, repeats)
    run = lambda g: pipe(image, 20.0, num_inference_steps=steps, seeds=[0], min_guidance=g[0], max_guidance=g[1])
    run((1.0, 2.5))
    t_cfg = best_of(lambda: run((1.0, 2.5)), repeats)
    t_plain = best_of(lambda: run((1.0, 1.0)), repeats)
    return {"frames": cfg.num_frames, "resolution": cfg.resolution, "steps": steps,
            "unet_params": sum(p.numel() for p in comps.unet.parameters()),
            "unet_forward_s": round(t_unet, 4), "s_per_video_guided": round(t_cfg, 3),
            "s_per_video_unguided": round(t_plain, 3),
            "guided_over_unet_forward": round(t_cfg / t_unet, 1),
            "unguided_over_unet_forward": round(t_plain / t_unet, 1),
            "guided_over_unguided": round(t_cfg / t_plain, 2)}


class _Counter(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes of every tensor an op returns (meta tensors: nothing is computed)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def paper_model(config_dir: Path, frames: int = 16, resolution: int = 512) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    m = build_modules(config_dir, "video")
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in m.items()}
    unet = params["unet"]
    gib = 2 ** 30
    out = {"params": params, "params_total": sum(params.values()),
           "weights_gib": {dt: round(sum(params.values()) * b / gib, 2) for dt, b in (("fp32", 4), ("bf16", 2))},
           # full fine-tune of the UNet: fp32 weights + grads + AdamW m, v + EMA copy; VAE and CLIP frozen in bf16
           "training_state_gib": round((unet * (4 + 4 + 8 + 4) + (params["vae"] + params["image_encoder"]) * 2) / gib, 2)}
    h = resolution // 8
    unet_m = m["unet"].to_empty(device="meta")
    x = torch.empty(1, frames, 8, h, h, device="meta", dtype=torch.bfloat16)
    unet_m.to(torch.bfloat16)
    ids = torch.empty(1, 3, device="meta", dtype=torch.bfloat16)
    clip = torch.empty(1, 1, 1024, device="meta", dtype=torch.bfloat16)
    try:
        flops, acts = FlopCounterMode(display=False), _Counter()
        with flops, acts, torch.no_grad():
            unet_m(x, torch.empty(1, device="meta"), encoder_hidden_states=clip, added_time_ids=ids)
        out["unet_forward_tflops_per_video"] = round(flops.get_total_flops() / 1e12, 2)
        out["unet_forward_activations_upper_bound_gib_bf16"] = round(acts.bytes / gib, 2)
        out["sampling_tflops_per_video_25_steps_cfg"] = round(2 * 25 * flops.get_total_flops() / 1e12, 1)
    except Exception as e:  # meta kernels missing for some op: keep the rest
        out["flops_error"] = str(e).splitlines()[0][:200]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="stage-1 model benchmark")
    p.add_argument("--config", default=str(default_config_dir() / "tiny_cpu.yaml"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=25, help="sampler steps for the tiny model (paper: 25)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is far faster on a loaded machine)")
    p.add_argument("--out", default="outputs/benchmarks")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    path = out / "stage1.json"
    results = read_json(path) if path.is_file() else {}
    results["meta"] = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "load_avg": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results["sampling_tiny_cpu"] = sampling(model_config(args.config), args.repeats, args.steps)
    print(results["sampling_tiny_cpu"])
    results["paper_model"] = paper_model(default_config_dir())
    print(results["paper_model"])
    write_json(path, results)
    s, pm = results["sampling_tiny_cpu"], results["paper_model"]
    md = [f"# stage-1 benchmark\n\n{results['meta']}\n",
          f"## Sampling, tiny model on CPU ({s['frames']} frames, {s['resolution']}², {s['steps']} Euler steps)\n",
          "| | seconds | × one UNet forward |", "|---|---|---|",
          f"| one UNet forward (baseline) | {s['unet_forward_s']} | 1 |",
          f"| video, CFG 1.0→2.5 | {s['s_per_video_guided']} | {s['guided_over_unet_forward']} |",
          f"| video, no guidance | {s['s_per_video_unguided']} | {s['unguided_over_unet_forward']} |",
          "\n## Paper-size model (meta device, 16 × 512²)\n", "| quantity | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in pm.items()]
    write_bytes(out / "stage1.md", ("\n".join(md) + "\n").encode())
    print(f"wrote {path} and {out / 'stage1.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
