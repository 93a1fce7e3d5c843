#!/usr/bin/env python
"""GPU check: every CUDA path of hi3d at paper size with randomly initialised weights (no weights needed).

    python scripts/gpu_check.py [--wheels DIR] [--out outputs/gpu_check] [--cpu-smoke] [--only STEP ...]

``--wheels DIR`` first installs DIR's wheels offline (``pip install --no-index --no-deps``; hi3d itself is imported
from this checkout; DIR from
``scripts/gpu_wheels.sh DIR``, which also puts a real object's 16-view 1024² orbit there). ``--cpu-smoke`` runs
every step at tiny size on the CPU (the flow, not the numbers). Each step's result or error lands in
``OUT/gpu_check.json`` and a table in ``OUT/gpu_check.md``; a failing step does not stop the others.
Steps (paper size; budgeted for <= 9 minutes on one H200):
- ``stage1_sample``: 25 Euler steps, 16 × 512², bf16 and fp16: s/video, peak memory;
- ``stage2_sample``: 16 × 1024², default and ``low_memory`` (target <= 24 GB): s/video, peak memory;
- ``train_stage1`` / ``train_stage2``: AdamW steps at the paper's per-GPU batch (2 × 16 × 512², 1 × 16 × 1024²),
  bf16, gradient checkpointing, EMA: s/step, peak memory; ``train_stage1_zero2``: the stage-1 step again under
  ``accelerate launch --config_file configs/accelerate/1gpu_zero2.yaml`` (DeepSpeed ZeRO-2, as the release);
- ``rasterizer``: gsplat vs hi3d's plain-torch tile rasteriser on one scene, forward and gradients, speed ratio
  (the first gsplat call includes its JIT CUDA build, timed apart); SH colours (``sh_degree`` 3) on the device;
- ``reconstruct``: ``hi3d reconstruct`` of the real orbit with ``configs/recon/neus_high.yaml`` (iterations cut
  to the budget, recorded): seconds per stage, Chamfer and volume IoU against the source mesh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # hi3d from this checkout (no install: the GPU machine may lack a build backend)
STEPS = ("stage1_sample", "stage2_sample", "train_stage1", "train_stage2", "train_stage1_zero2", "rasterizer",
         "reconstruct")


@dataclasses.dataclass
class Size:
    frames: int
    res1: int  # stage-1 resolution (stage 2 refines to 2x)
    steps: int  # sampler steps
    batch1: int  # training videos per step, stage 1 / stage 2
    batch2: int
    gaussians: int  # rasteriser scene
    raster_res: int
    orbit_res: int
    recon: tuple[str, ...]  # reconstruct overrides on neus_high.yaml


PAPER = Size(16, 512, 25, 2, 1, 200_000, 1024, 1024,
             ("neus.iterations=3000", "neus.checkpoint_every=1000", "gaussians.iterations=3000",
              "gaussians.densify_stop=2500", "mesh.texture=vertex"))
SMOKE = Size(2, 32, 2, 1, 1, 500, 64, 64,
             ("device=cpu", "gaussians.iterations=10", "gaussians.num_points=300", "gaussians.train_resolution=64",
              "gaussians.densify_start=2", "gaussians.densify_every=4", "gaussians.densify_stop=8",
              "gaussians.hull_resolution=24", "neus.iterations=10", "neus.batch_rays=128", "neus.num_samples=16",
              "neus.num_importance=8", "neus.up_sample_steps=1", "neus.num_levels=4", "neus.log2_hashmap_size=12",
              "neus.max_resolution=32", "neus.eikonal_points=256", "neus.chunk=16384", "mesh.resolution=32",
              "mesh.texture=vertex", "turntable_views=2", "turntable_resolution=32"))


def install_wheels(folder: Path) -> dict:
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_check: no wheels in {folder} (make them with scripts/gpu_wheels.sh {folder})")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *wheels], check=True)
    return {"wheels": len(wheels), "seconds": round(time.perf_counter() - start, 1)}


# ---------------------------------------------------------------------------------------------- helpers
def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def timed(device, fn):
    peak_reset(device)
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, round(time.perf_counter() - start, 2), peak_gb(device)


def paper_components(stage: int, device, smoke: bool):
    """Stage-1 or stage-2 components: paper size from ``configs/stage*/`` built directly on ``device`` (random
    constructor init), or the tiny ones with ``--cpu-smoke``."""
    import torch

    from hi3d.models import stage1, stage2
    from hi3d.models.conditioning import install_slot_projection
    from hi3d.models.convert import read_config
    from hi3d.models.depth import DepthEstimator
    from hi3d.models.svd import match_sgm_norm_eps

    size = SMOKE if smoke else PAPER
    if stage == 1:
        cfg = stage1.Stage1Config(num_frames=size.frames, resolution=size.res1, tiny=stage1.TinyConfig(enabled=smoke))
    else:
        cfg = stage2.Stage2Config(num_frames=size.frames, resolution=2 * size.res1, tiny=stage1.TinyConfig(enabled=smoke))
        if smoke:
            cfg.depth.input_size = 32
    if smoke:
        return cfg, (stage1.tiny_components(cfg) if stage == 1 else stage2.tiny_components(cfg))
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, DPTConfig, DPTForDepthEstimation

    d1, d = ROOT / "configs" / "stage1", ROOT / "configs" / f"stage{stage}"
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel.from_config(read_config(d / "unet.json"))
        vae = AutoencoderKLTemporalDecoder.from_config(read_config(d1 / "vae.json"))
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**read_config(d1 / "image_encoder.json"))).eval()
        depth = DepthEstimator(DPTForDepthEstimation(DPTConfig(**read_config(d / "depth.json"))).eval(), cfg.depth) \
            if stage == 2 else None
    install_slot_projection(unet, cfg.slots)
    match_sgm_norm_eps(unet)
    unet.to(device)
    fe = CLIPImageProcessor(**{k: v for k, v in read_config(d1 / "feature_extractor.json").items() if k != "_comment"})
    if stage == 1:
        return cfg, stage1.Stage1Components(unet, vae, clip, fe)
    return cfg, stage2.Stage2Components(unet, vae, clip, fe, depth)


# ---------------------------------------------------------------------------------------------- steps
def train_steps(task, batch, mixed: str, steps: int = 2) -> dict:
    """AdamW + EMA steps of ``task.unet`` (gradient checkpointing, ``mixed`` precision) through accelerate, as
    the training loop does (under ``accelerate launch`` with a DeepSpeed config, through DeepSpeed)."""
    import torch
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

    from hi3d.training.loop import check_ema_sharding

    acc = Accelerator(mixed_precision=mixed)
    check_ema_sharding(acc.state, 0.9999)
    ds = acc.state.deepspeed_plugin
    if ds is not None:
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = batch["frames"].shape[0]
        ds.deepspeed_config["gradient_clipping"] = 1.0
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
    for m in task.frozen_modules():
        m.requires_grad_(False).eval().to(acc.device, dtype=dtype)
    unet = task.unet
    unet.enable_gradient_checkpointing()
    unet.to(acc.device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ema = EMAModel(params, decay=0.9999)
    model, opt = acc.prepare(unet, opt)
    gen = torch.Generator(acc.device).manual_seed(0)
    batch = {k: v.to(acc.device) for k, v in batch.items()}
    times, loss = [], None
    peak_reset(acc.device)
    for _ in range(steps):
        sync(acc.device)
        start = time.perf_counter()
        loss = task.training_loss(model, batch, gen)
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        sync(acc.device)
        times.append(round(time.perf_counter() - start, 2))
    out = {"s_per_step": times[-1], "first_step_s": times[0], "peak_gb": peak_gb(acc.device), "loss": float(loss),
           "batch": list(batch["frames"].shape), "mixed_precision": acc.mixed_precision,
           "distributed_type": str(acc.state.distributed_type), "zero_stage": ds.zero_stage if ds else None}
    del model, opt, ema
    return out


def step_train(stage: int, device, smoke: bool) -> tuple[dict, object]:
    import torch

    from hi3d.training.stage1 import Stage1Task
    from hi3d.training.stage2 import Stage2Task

    size = SMOKE if smoke else PAPER
    cfg, comps = paper_components(stage, device, smoke)
    task = (Stage1Task if stage == 1 else Stage2Task)(cfg, comps)
    B, res = (size.batch1, size.res1) if stage == 1 else (size.batch2, 2 * size.res1)
    g = torch.Generator().manual_seed(0)
    batch = {"frames": torch.rand(B, size.frames, 3, res, res, generator=g) * 2 - 1,
             "elevation": torch.full((B,), 20.0)}
    result = train_steps(task, batch, "no" if device.type == "cpu" else "bf16")
    for p in comps.unet.parameters():
        p.grad = None
    comps.unet.disable_gradient_checkpointing()
    comps.unet.eval()
    return result, (cfg, comps)


def step_stage1_sample(device, smoke, built=None) -> dict:
    import torch

    from hi3d.pipelines.orbit import OrbitPipeline

    size = SMOKE if smoke else PAPER
    cfg, comps = built or paper_components(1, device, smoke)
    pipe = OrbitPipeline.from_components(comps, cfg)
    image = torch.rand(1, 3, size.res1, size.res1, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if device.type == "cpu" and name == "fp16":
            out[name] = {"skipped": "fp16 sampling is a GPU path"}
            continue
        pipe.to(device, dtype)
        frames, s, peak = timed(device, lambda: pipe.generate(image, 20.0, torch.Generator().manual_seed(0),
                                                              num_inference_steps=size.steps))
        out[name] = {"s_per_video": s, "peak_gb": peak, "finite": bool(torch.isfinite(frames).all()),
                     "shape": list(frames.shape)}
    return out


def step_stage2_sample(device, smoke, built=None) -> dict:
    import torch

    from hi3d.pipelines.refine import RefinePipeline

    size = SMOKE if smoke else PAPER
    cfg, comps = built or paper_components(2, device, smoke)
    frames = torch.rand(1, size.frames, 3, size.res1, size.res1, generator=torch.Generator().manual_seed(0))
    out = {}
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    for low_memory in (False, True):
        pipe = RefinePipeline.from_components(comps, dataclasses.replace(cfg, low_memory=low_memory))
        pipe.to(device, dtype)  # low_memory: the placement keeps the components on the CPU between uses
        res, s, peak = timed(device, lambda: pipe.refine(frames, 20.0, generator=torch.Generator().manual_seed(0),
                                                         num_inference_steps=size.steps))
        out["low_memory" if low_memory else "default"] = {
            "s_per_video": s, "peak_gb": peak, "finite": bool(torch.isfinite(res).all()), "shape": list(res.shape),
            "offload": pipe.placement.offload}
    if device.type == "cuda":
        out["low_memory_fits_24gb"] = out["low_memory"]["peak_gb"] <= 24.0
    return out


def step_zero2(args) -> dict:
    """The stage-1 training step again, in a child process under accelerate + the shipped ZeRO-2 config."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "deepspeed is not installed (scripts/gpu_wheels.sh builds its wheel)"}
    if args.cpu_smoke:
        return {"skipped": "DeepSpeed ZeRO-2 needs a CUDA device"}
    out = Path(args.out) / "zero2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/1gpu_zero2.yaml"), str(Path(__file__).resolve()), "--out", str(out),
           "--only", "train_stage1"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch failed ({proc.returncode}): {proc.stderr[-1500:]}")
    child = json.loads((out / "gpu_check.json").read_text())["steps"]["train_stage1"]
    if "error" in child:
        raise RuntimeError(child["error"])
    return {**child, "launch_total_s": round(time.perf_counter() - start, 1)}


def step_rasterizer(device, smoke) -> dict:
    import torch

    from hi3d import cameras
    from hi3d.recon.gaussians import GaussianModel
    from hi3d.recon.rasterize import rasterize

    size = SMOKE if smoke else PAPER
    g = torch.Generator().manual_seed(0)
    n, W = size.gaussians, size.raster_res
    scene = [(torch.rand(n, 3, generator=g) - 0.5) * 0.9, torch.randn(n, 4, generator=g),
             0.004 + 0.02 * torch.rand(n, 3, generator=g), 0.9 * torch.rand(n, generator=g), torch.rand(n, 3, generator=g)]
    c2w, K = cameras.orbit_c2w(30.0, 20.0, 1.5), cameras.intrinsics(W, W)
    fast = "gsplat" if device.type == "cuda" else "dense"  # CPU: the tile rasteriser against the dense reference

    def run(backend):
        params = [p.clone().to(device).requires_grad_() for p in scene]
        out = rasterize(*params, c2w, K, W, W, background=torch.ones(3, device=device), backend=backend)
        (out.rgb.square().sum() + out.alpha.sum()).backward()
        return out, [p.grad for p in params]

    result = {"gaussians": n, "resolution": W, "reference": "tiles", "fast": fast}
    _, result["first_call_s"], _ = timed(device, lambda: run(fast))  # gsplat: includes its JIT CUDA build
    (ref, ref_g), t_ref, _ = timed(device, lambda: run("tiles"))
    (fst, fst_g), t_fast, _ = timed(device, lambda: run(fast))
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))
    result.update(rgb_mean_abs_diff=float((ref.rgb - fst.rgb).abs().mean()),
                  alpha_mean_abs_diff=float((ref.alpha - fst.alpha).abs().mean()),
                  grad_cosine={k: round(cos(a, b), 5) for k, a, b in zip(("means", "quats", "scales", "opacities",
                                                                           "colors"), ref_g, fst_g)},
                  tiles_s=t_ref, fast_s=t_fast, speed_ratio=round(t_ref / max(t_fast, 1e-9), 1))
    # SH colours (degree 3) on the device: gsplat's helper against the degree-0 closed form on the DC band
    model = GaussianModel(*[p.to(device) for p in scene[:4]], torch.randn(n, 1, 3, device=device) * 0.3,
                          torch.zeros(n, 15, 3, device=device), sh_degree=3)
    dc = (0.28209479177387814 * model.params["sh0"][:, 0] + 0.5).clamp_min(0)
    result["sh3_dc_max_abs_diff"] = float((model.colors(torch.zeros(3, device=device)) - dc).abs().max())
    return result


def step_reconstruct(device, smoke, orbit_dir: Path | None, mesh_path: Path | None, out: Path) -> dict:
    from hi3d.config import load_config
    from hi3d.data.mesh_io import load_world_mesh
    from hi3d.data.orbit import load_orbit
    from hi3d.eval.metrics import chamfer_distance, volume_iou
    from hi3d.io import read_json
    from hi3d.recon.reconstruct import ReconstructConfig, reconstruct

    size = SMOKE if smoke else PAPER
    if mesh_path is None:
        from hi3d.data.real_objects import resolve_object

        mesh_path = resolve_object("bunny")
    if orbit_dir is None or not (orbit_dir / "cameras.json").is_file():
        from hi3d.data.orbit import save_orbit
        from hi3d.data.render import RenderConfig, render_orbit

        orbit_dir = out / "orbit"
        save_orbit(render_orbit(mesh_path, RenderConfig(num_views=16, resolution=size.orbit_res)), orbit_dir)
    cfg = load_config(ReconstructConfig, ROOT / "configs/recon/neus_high.yaml", list(size.recon))
    result = {"orbit": str(orbit_dir), "views": len(load_orbit(orbit_dir, load_depth=False)), "overrides": list(size.recon)}
    start = time.perf_counter()
    try:
        reconstruct(orbit_dir, out / "recon", 16, cfg, progress=False)
    except Exception as e:  # the turntable needs OpenGL (EGL); the mesh is written before it
        if not (out / "recon" / "mesh.ply").is_file():
            raise
        result["turntable_error"] = str(e).splitlines()[0][:200]
    result["total_s"] = round(time.perf_counter() - start, 1)
    stages = read_json(out / "recon" / "run.json")["stages"]
    result["stages"] = {k: {"s": v["wall_time_s"], "device": v.get("device"), "peak_gb": (
        round(v["cuda_peak_mb"] / 1024, 2) if "cuda_peak_mb" in v else None)} for k, v in stages.items()}
    norm = load_orbit(orbit_dir, load_depth=False).normalization.numpy()
    pred, gt = load_world_mesh(out / "recon" / "mesh.ply", norm), load_world_mesh(mesh_path, norm)
    result.update(object=Path(mesh_path).name, chamfer=round(chamfer_distance(pred, gt), 5),
                  volume_iou=round(volume_iou(pred, gt), 4))
    return result


# ---------------------------------------------------------------------------------------------- report
def write_report(out: Path, report: dict) -> None:
    from hi3d.io import write_bytes, write_json

    write_json(out / "gpu_check.json", report)
    lines = [f"# hi3d GPU check ({report['mode']})", "", f"{report['device']}; torch {report['torch']}; "
             f"total {report['total_s']} s", "", "| step | s | result |", "|---|---|---|"]
    for name, r in report["steps"].items():
        brief = r.get("error") or r.get("skipped") or json.dumps({k: v for k, v in r.items() if k != "seconds"})
        lines.append(f"| {name} | {r.get('seconds', '')} | {str(brief).replace('|', '/')} |")
    write_bytes(out / "gpu_check.md", ("\n".join(lines) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", type=Path, help="install DIR's wheels offline first (scripts/gpu_wheels.sh DIR)")
    p.add_argument("--out", default="outputs/gpu_check")
    p.add_argument("--cpu-smoke", action="store_true", help="every step at tiny size on the CPU")
    p.add_argument("--only", nargs="+", choices=STEPS, help="run these steps only")
    p.add_argument("--orbit", type=Path, help="orbit folder to reconstruct (default: WHEELS/bunny_orbit, else rendered)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    installed = install_wheels(args.wheels) if args.wheels else None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (run with --cpu-smoke for the tiny CPU flow)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    smoke = args.cpu_smoke
    orbit = args.orbit or (args.wheels / "bunny_orbit" if args.wheels else None)
    mesh = args.wheels / "bunny.obj" if args.wheels and (args.wheels / "bunny.obj").is_file() else None
    report = {"mode": "cpu-smoke" if smoke else "paper size", "device": torch.cuda.get_device_name(0) if
              device.type == "cuda" else platform.processor() or "cpu", "torch": torch.__version__,
              "python": platform.python_version(), "cpus": os.cpu_count(), "install": installed, "steps": {}}
    built = {}

    def train(stage):
        result, built[stage] = step_train(stage, device, smoke)
        return result

    steps = {"train_stage1": lambda: train(1), "stage1_sample": lambda: step_stage1_sample(device, smoke, built.get(1)),
             "train_stage2": lambda: train(2), "stage2_sample": lambda: step_stage2_sample(device, smoke, built.get(2)),
             "train_stage1_zero2": lambda: step_zero2(args), "rasterizer": lambda: step_rasterizer(device, smoke),
             "reconstruct": lambda: step_reconstruct(device, smoke, orbit, mesh, out)}
    start = time.perf_counter()
    for name, fn in steps.items():  # training first: the trained (fp32) components are then cast for sampling
        if args.only and name not in args.only:
            continue
        if name == "stage2_sample" and 1 in built:
            built.pop(1)  # free stage 1 before the 1024² runs
        t0 = time.perf_counter()
        try:
            r = fn()
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                 "traceback": traceback.format_exc()[-2000:]}
        r["seconds"] = round(time.perf_counter() - t0, 1)
        report["steps"][name] = r
        print(f"{name}: {r['seconds']} s {'ERROR ' + r['error'] if 'error' in r else ''}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = round(time.perf_counter() - start, 1)
    write_report(out, report)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({report['total_s']} s)")
    return 1 if any("error" in r for r in report["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
