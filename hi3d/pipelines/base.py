"""``VideoDiffusionPipeline``: what the stage-1 (``OrbitPipeline``) and stage-2 (``RefinePipeline``) pipelines
share — components by name, the stage config, ``from_pretrained`` / ``save_pretrained`` on local folders,
``to(device)``, and the sampling loop (``hi3d.models.sampler``: Euler EDM over Karras σ, linear per-frame
guidance, per-video generators). A stage adds only its conditioning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch

from hi3d.models import edm, sampler
from hi3d.models.svd import PIPELINE_FILE, decode_latents, module_device_dtype, save_stage_folder
from hi3d.pipelines.placement import Placement


class VideoDiffusionPipeline:
    """Base of the stage pipelines. Subclasses set ``components_class`` (a dataclass of the components, e.g.
    ``Stage1Components``), ``config_class`` (the stage config) and ``load_components(folder, cfg, torch_dtype)``."""

    components_class: ClassVar[type]
    config_class: ClassVar[type]
    load_components: ClassVar[Callable]

    def __init__(self, config=None, **components):
        names = self.component_names()
        unknown = set(components) - set(names)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown components {sorted(unknown)}")
        for name in names:
            setattr(self, name, components.get(name))
        self.config = config if config is not None else self.config_class()
        self.placement = Placement("cpu")  # resident: components stay where they are

    @classmethod
    def component_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls.components_class)]

    @property
    def components(self):
        return self.components_class(**{n: getattr(self, n) for n in self.component_names()})

    @classmethod
    def from_components(cls, components, config):
        return cls(**{n: getattr(components, n) for n in cls.component_names()}, config=config)

    @classmethod
    def from_pretrained(cls, folder: str | Path, torch_dtype=None, device=None, **overrides):
        """A folder from ``save_pretrained`` / the checkpoint converter (config in ``hi3d_pipeline.json``) or a
        plain SVD folder (the stage's defaults). ``overrides``: config keys and values, e.g. ``low_memory=True``."""
        from hi3d.config import load_config

        folder = Path(folder)
        meta = folder / PIPELINE_FILE
        items = [f"pretrained={folder}"] + [f"{k}={v}" for k, v in overrides.items()]
        cfg = load_config(cls.config_class, meta if meta.is_file() else None, items)
        cfg.tiny.enabled = False
        pipe = cls.from_components(cls.load_components(folder, cfg, torch_dtype=torch_dtype), cfg)
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, folder: str | Path) -> None:
        """One subfolder per component + ``hi3d_pipeline.json`` (the config), swapped in atomically."""
        save_stage_folder(folder, {n: getattr(self, n) for n in self.component_names()}, self.config)

    def modules(self) -> list[torch.nn.Module]:
        return [m for n in self.component_names() if isinstance(m := getattr(self, n), torch.nn.Module)]

    def to(self, device=None, dtype=None, low_memory: bool | None = None):
        """Components to ``device`` (default: the current one), or with ``low_memory`` (default: the config's,
        if it has one) kept on the CPU and moved to an accelerator ``device`` around each use."""
        low_memory = getattr(self.config, "low_memory", False) if low_memory is None else low_memory
        return self.place(Placement.decide(self.device if device is None else device, low_memory), dtype)

    def place(self, placement: Placement, dtype=None):
        self.placement = placement
        placement.place(self.modules(), dtype)
        return self

    @property
    def device(self) -> torch.device:
        """Where the components run (under offload they live on the CPU between uses)."""
        return self.placement.compute_device if self.placement.offload else module_device_dtype(self.unet)[0]

    def sample_latents(self, concat: torch.Tensor, clip: torch.Tensor, ids: torch.Tensor,
                       generators: Sequence[torch.Generator | None], num_inference_steps: int, min_guidance: float,
                       max_guidance: float, start: str = "noise", init: torch.Tensor | None = None,
                       strength: float = 1.0, blend_power: float = sampler.RELEASE_BLEND_POWER,
                       sequential: bool = False) -> torch.Tensor:
        """The shared sampling loop: ε₀ ``[B, F, C, h, w]`` from ``generators`` (one per video), guided denoiser
        of ``self.unet`` on the conditions, ``sampler.sample`` with ``start`` from ``init`` (scaled latents)."""
        cfg = self.config
        B, Fr, _, h, w = concat.shape
        sigmas = edm.karras_sigmas(num_inference_steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).tolist()
        noise = sampler.batch_randn(generators, (Fr, self.unet.config.out_channels, h, w), concat.device)
        denoiser = sampler.guided_denoiser(self.unet, concat, clip, ids, min_guidance, max_guidance, sequential)
        return sampler.sample(denoiser, noise, sigmas, start, init, strength, blend_power)

    def decode(self, latents: torch.Tensor, chunk: int) -> torch.Tensor:
        """Scaled latents ``[B, F, 4, h, w]`` -> frames ``[B, F, 3, H, W]`` float32 in [0, 1]."""
        return ((decode_latents(self.vae, latents, chunk) + 1) / 2).clamp(0, 1)
