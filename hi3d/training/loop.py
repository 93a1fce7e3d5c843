"""The accelerate training loop shared by both diffusion stages.

``train(cfg, task, dataset, val_batch)`` owns the ``Accelerator`` (mixed precision, gradient accumulation,
DDP / multi-node / DeepSpeed ZeRO-2 through ``accelerate config`` + ``accelerate launch``), AdamW, lr
warm-up, EMA weights (diffusers ``EMAModel``), validation grids, TensorBoard logging, a progress bar and
crash-safe checkpoints (``hi3d.training.checkpoint``) that ``resume`` continues exactly: optimizer,
scheduler, EMA, grad scaler, RNG states, training generator and data position.

The stage-specific part is the ``DiffusionTask`` (``hi3d.training.task``); ``task.training_loss``
receives the raw batch, so a task can post-process it on the device (e.g. stage 2's degradation).

Data: with a map-style dataset, epoch ``e`` is a seeded permutation of all objects, cut into
``world_size * batch_size`` groups (the dataset is repeated if it is smaller); process ``r`` takes every
``world_size``-th object, so processes see different objects. Iterable datasets (shards) split
themselves (``set_distributed``) and restart at a batch position (``set_position``).

Output folder::

    config.yaml  run.json  logs/ (TensorBoard)  samples/step-00000500.png  checkpoints/step-00000500/
    final/ (``task.save_pretrained`` with EMA weights if EMA is on)  object_ids/rank0.txt (optional)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from hi3d.config import to_dict, to_yaml
from hi3d.data.datasets import seed_of
from hi3d.errors import ConfigError, Hi3DError
from hi3d.io import contact_sheet, save_png, write_bytes
from hi3d.provenance import RunRecord
from hi3d.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from hi3d.training.task import DiffusionTask

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = "outputs/train"
    steps: int = 1000
    """Optimizer steps (each of ``grad_accum`` micro-batches per process)."""
    batch_size: int = 1
    """Per process and micro-batch; total batch = batch_size x processes x grad_accum."""
    grad_accum: int = 1
    lr: float = 1e-5
    lr_scheduler: str = "constant_with_warmup"
    """Any diffusers ``get_scheduler`` name (constant_with_warmup, cosine, linear, ...)."""
    warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables."""
    mixed_precision: str = "no"
    """no | fp16 | bf16 (passed to the Accelerator: takes precedence over the accelerate config)."""
    gradient_checkpointing: bool = False
    ema_decay: float = 0.9999
    """EMA of the trained weights (diffusers EMAModel, warm-up (1+t)/(10+t)); 0 disables."""
    checkpoint_every: int = 1000
    keep_last: int = 3
    validate_every: int = 1000
    """Validation sample grid every N steps (and at the end); 0 disables."""
    log_every: int = 10
    seed: int = 0
    num_workers: int = 4
    resume: bool = False
    """Continue from the latest complete checkpoint in ``output_dir`` (fresh start if there is none)."""
    log_object_ids: bool = False
    """Append the object ids of every micro-batch to ``object_ids/rank<r>.txt``."""
    allow_tf32: bool = True


@dataclasses.dataclass
class TrainResult:
    step: int
    losses: list[float]
    """Mean loss of each optimizer step run in this call (this process)."""
    unet: torch.nn.Module
    """The unwrapped trained network (raw, not EMA, weights)."""
    ema: object | None
    """diffusers ``EMAModel`` (``.shadow_params``), or None."""
    out_dir: Path


class _Counters:
    """Step and data position, checkpointed with the accelerate state."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def map_epoch_batches(n: int, epoch: int, batch_size: int, rank: int, world: int, seed: int) -> list[list[int]]:
    """This process's batches of epoch ``epoch`` over a map-style dataset of ``n`` objects, as dataset
    keys ``object + epoch * n`` (``OrbitDataset`` draws the epoch's augmentation from the key)."""
    g = torch.Generator().manual_seed(seed_of(seed, "epoch", epoch))
    group = world * batch_size
    reps = max(1, math.ceil(group / n))
    perm = torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])
    perm = perm[: len(perm) // group * group]
    mine = (perm[rank::world] + epoch * n).tolist()
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def iterate_batches(dataset, cfg: TrainConfig, rank: int, world: int, start: int,
                    pin_memory: bool = False) -> Iterator[dict]:
    """Endless stream of this process's micro-batches, starting after ``start`` of them."""
    loader_gen = torch.Generator().manual_seed(seed_of(cfg.seed, "loader", rank, start))
    kwargs = dict(num_workers=cfg.num_workers, pin_memory=pin_memory, collate_fn=default_collate,
                  generator=loader_gen)
    if isinstance(dataset, IterableDataset):
        dataset.set_distributed(rank, world)
        dataset.set_position(start, cfg.batch_size)
        yield from DataLoader(dataset, batch_size=cfg.batch_size, **kwargs)
        raise Hi3DError("the iterable dataset ended; it must stream forever")
    n = len(dataset)
    per_epoch = len(map_epoch_batches(n, 0, cfg.batch_size, rank, world, cfg.seed))
    first_epoch, skip = divmod(start, per_epoch)
    for epoch in itertools.count(first_epoch):
        batches = map_epoch_batches(n, epoch, cfg.batch_size, rank, world, cfg.seed)[skip:]
        skip = 0
        yield from DataLoader(dataset, batch_sampler=batches, **kwargs)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _flat_hparams(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def validation_grid(samples: torch.Tensor, batch: dict) -> torch.Tensor:
    """``[H', W', 3]`` grid: per validation object a row of ground-truth frames (if the batch has them)
    then a row of sampled frames. ``samples``: ``[B, F, 3, H, W]`` in [0, 1]."""
    rows = []
    for b in range(samples.shape[0]):
        if "frames" in batch and batch["frames"].shape[-2:] == samples.shape[-2:]:
            rows += list(((batch["frames"][b].float().cpu() + 1) / 2).permute(0, 2, 3, 1))
        rows += list(samples[b].float().cpu().clamp(0, 1).permute(0, 2, 3, 1))
    return contact_sheet(rows, cols=samples.shape[1])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]."""
    mse = torch.mean((a.float() - b.float()) ** 2).clamp_min(1e-10)
    return float(-10 * torch.log10(mse))


def check_ema_sharding(state, ema_decay: float) -> None:
    """EMA (diffusers ``EMAModel``) averages the parameter tensors each process holds: under parameter sharding
    (FSDP, DeepSpeed ZeRO-3) those are shards or empty placeholders, so the averages and the saved EMA weights
    would be wrong. Refused at start-up; DDP and ZeRO-1/2 (which shard optimizer states and gradients only) keep
    whole parameters on every process and are fine. ``state``: accelerate's ``AcceleratorState``."""
    from accelerate.utils import DistributedType

    if ema_decay <= 0:
        return
    ds = getattr(state, "deepspeed_plugin", None)
    kind = "FSDP" if state.distributed_type == DistributedType.FSDP else \
        "DeepSpeed ZeRO-3" if ds is not None and ds.zero_stage == 3 else None
    if kind:
        raise ConfigError(f"train.ema_decay={ema_decay} under {kind}: EMA of sharded parameters is not supported; "
                          "train with DDP or ZeRO-2 (configs/accelerate/) or set train.ema_decay=0")


def train(cfg: TrainConfig, task: DiffusionTask, dataset, val_batch: dict | None = None, *,
          record_config=None, command: str = "train",
          checkpoint_hook: Callable[[str, Path], None] | None = None) -> TrainResult:
    """Train ``task.unet`` on ``dataset`` (samples as in ``hi3d.data.datasets``) for ``cfg.steps`` steps.

    ``val_batch``: a collated batch whose conditions ``task.sample`` uses for validation grids.
    ``record_config``: the full job config written to ``config.yaml`` / ``run.json`` (default ``cfg``).
    ``checkpoint_hook``: see ``save_checkpoint`` (crash tests).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"train.mixed_precision '{cfg.mixed_precision}' is not one of no, fp16, bf16")
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    check_ema_sharding(accelerator.state, cfg.ema_decay)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if cfg.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ds_plugin = accelerator.state.deepspeed_plugin
    if ds_plugin is not None:  # no dataloader goes through prepare(), so DeepSpeed needs the batch size
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        if ds_plugin.deepspeed_config.get("gradient_clipping") == "auto":
            ds_plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in task.frozen_modules():
        module.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    unet = task.unet
    if cfg.gradient_checkpointing:
        if not hasattr(unet, "enable_gradient_checkpointing"):
            raise ConfigError(f"{type(unet).__name__} has no gradient checkpointing; set train.gradient_checkpointing=false")
        unet.enable_gradient_checkpointing()
    unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    model, optimizer = accelerator.prepare(unet, optimizer)
    counters = _Counters()
    accelerator.register_for_checkpointing(scheduler, counters, *([ema] if ema else []))

    generator = torch.Generator(device=device).manual_seed(seed_of(cfg.seed, "train", rank))
    batches_done = 0
    resumed_from = None
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            accelerator.print(f"resume: no checkpoint in {out / 'checkpoints'}; starting from step 0")
        else:
            own = load_checkpoint(accelerator, ckpt)
            resumed_from = str(ckpt)
            if own is None:
                accelerator.print(f"resume: {ckpt} has no state for process {rank} (fewer processes before); "
                                  "reseeding its generator and data position")
                generator.manual_seed(seed_of(cfg.seed, "train", rank, counters.step))
                batches_done = counters.step * cfg.grad_accum
            else:
                generator.set_state(own["generator"])
                batches_done = own["batches_done"]
                if own.get("world_size") != world:
                    accelerator.print(f"resume: checkpoint written by {own.get('world_size')} processes, now {world}:"
                                      " data order differs from an uninterrupted run")
    start_step = counters.step

    record = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_bytes(out / "config.yaml", to_yaml(record_config if record_config is not None else cfg).encode())
        record = RunRecord(out, command, config=record_config if record_config is not None else cfg,
                           seed=cfg.seed, device=device)
        record.add(world_size=world, mixed_precision=accelerator.mixed_precision, resumed_from=resumed_from,
                   total_batch=cfg.batch_size * world * cfg.grad_accum)
    accelerator.init_trackers("hi3d", config=_flat_hparams(to_dict(cfg)))

    data = iterate_batches(dataset, cfg, rank, world, batches_done, pin_memory=device.type == "cuda")
    ids_log = out / "object_ids" / f"rank{rank}.txt" if cfg.log_object_ids else None
    if ids_log:
        ids_log.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint(step: int) -> None:
        state = {"generator": generator.get_state(), "batches_done": batches_done, "world_size": world}
        save_checkpoint(accelerator, out, step, state, cfg.keep_last, hook=checkpoint_hook)

    def validate(step: int) -> None:
        if val_batch is None or not main:
            return
        net = accelerator.unwrap_model(model)
        if ema:
            ema.store(net.parameters())
            ema.copy_to(net.parameters())
        net.eval()
        try:
            with accelerator.autocast():
                samples = task.sample(net, to_device(val_batch, device), torch.Generator(device).manual_seed(cfg.seed))
        finally:
            net.train()
            if ema:
                ema.restore(net.parameters())
        grid = validation_grid(samples, val_batch)
        save_png(out / "samples" / f"step-{step:08d}.png", grid)
        logs = {}
        if "frames" in val_batch and val_batch["frames"].shape[-2:] == samples.shape[-2:]:
            logs["val/psnr"] = psnr(samples.cpu().clamp(0, 1), (val_batch["frames"].float() + 1) / 2)
        tb = accelerator.get_tracker("tensorboard", unwrap=True)
        tb.add_image("val/samples", grid.permute(2, 0, 1), step)
        if logs:
            accelerator.log(logs, step=step)

    losses: list[float] = []
    micro: list[torch.Tensor] = []
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not main, desc="train", dynamic_ncols=True)
    t0, step = time.perf_counter(), start_step
    with (record.stage("train") if record else contextlib.nullcontext()) as stage:
        while step < cfg.steps:
            batch = next(data)
            batches_done += 1
            if ids_log:
                with open(ids_log, "a") as f:
                    f.write(f"{step}\t{','.join(batch['object_id'])}\n")
            with accelerator.accumulate(model):
                loss = task.training_loss(model, to_device(batch, device), generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            if ema:
                ema.step(params)
            step += 1
            counters.step = step
            losses.append(float(torch.stack(micro).float().mean()))
            micro = []
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                mean = float(accelerator.gather(torch.tensor([losses[-1]], device=device)).mean())
                accelerator.log({"train/loss": mean, "train/lr": scheduler.get_last_lr()[0]}, step=step)
                bar.set_postfix(loss=f"{mean:.4g}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(step)
            if cfg.validate_every and (step % cfg.validate_every == 0 or step == cfg.steps):
                validate(step)
        if stage is not None:
            run_steps = step - start_step
            stage.update(steps=run_steps, steps_per_s=run_steps / max(time.perf_counter() - t0, 1e-9))
    bar.close()

    net = accelerator.unwrap_model(model)
    accelerator.wait_for_everyone()
    if main:
        if ema:
            ema.store(net.parameters())
            ema.copy_to(net.parameters())
        tmp = out / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        task.save_pretrained(net, tmp)
        if ema:
            ema.restore(net.parameters())
        shutil.rmtree(out / "final", ignore_errors=True)
        tmp.rename(out / "final")
        record.add_weights(out / "final")
        record.finish(final_step=step, final_loss=losses[-1] if losses else None)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(step=step, losses=losses, unet=net, ema=ema, out_dir=out)
