"""What a diffusion stage gives the shared training loop (``hi3d.training.loop``).

Stage 1 (``hi3d.training.stage1``) and stage 2 (``hi3d.training.stage2``) each implement ``DiffusionTask``;
the loop owns accelerate, optimisation, EMA, checkpoints, logging and validation scheduling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class DiffusionTask(Protocol):
    unet: torch.nn.Module
    """The trainable network; the loop passes it through ``accelerator.prepare`` and EMA."""

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules used but not trained (VAE, image encoder, depth model); the loop moves them to the
        device, sets ``eval()`` and ``requires_grad_(False)``."""

    def training_loss(self, unet: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scalar loss for one batch from the dataset (``unet`` may be the accelerate-wrapped one).
        All randomness (σ, noise, noise augmentation, condition dropout, degradation) from ``generator``."""

    @torch.no_grad()
    def sample(self, unet: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Validation frames ``[B, F, 3, H, W]`` in [0, 1] for the batch's conditions."""

    def save_pretrained(self, unet: torch.nn.Module, folder: str | Path) -> None:
        """Write a diffusers-format folder loadable by the stage's pipeline ``from_pretrained``."""
