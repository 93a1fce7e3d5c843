"""Where a pipeline's components live while it runs, decided from the requested device.

``Placement.decide(device, low_memory)``:
- resident (default, or any request on a CPU): every component on ``device``;
- offload (``low_memory`` on an accelerator): every component lives on the CPU and visits ``device`` only
  inside ``use(component, ...)`` — whole-model CPU offload, as diffusers' ``enable_model_cpu_offload``, done
  by explicit moves because the SVD helpers place their inputs on a module's parameter device.
Peak accelerator memory is then the largest component in use plus its activations, not the sum of all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

CPU = torch.device("cpu")


class Placement:
    """``device``: where components run; ``offload``: whether they are kept on the CPU between uses."""

    def __init__(self, device: torch.device | str, offload: bool = False):
        self.device = torch.device(device)
        self.offload = offload

    @classmethod
    def decide(cls, device: torch.device | str, low_memory: bool) -> Placement:
        device = torch.device(device)
        return cls(device, offload=low_memory and device.type != "cpu")

    @property
    def compute_device(self) -> torch.device:
        """Where the pipeline puts its tensors: ``device`` (a test's fake accelerator keeps them on the CPU)."""
        return self.device

    @property
    def home(self) -> torch.device:
        """Where a component lives when it is not in use."""
        return CPU if self.offload else self.device

    def move(self, module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
        """The one place a component changes device (a test's recording fake overrides it)."""
        module.to(device=device, dtype=dtype)

    def place(self, modules: Iterable[torch.nn.Module], dtype: torch.dtype | None = None) -> None:
        for m in modules:
            self.move(m, self.home, dtype)

    @contextlib.contextmanager
    def use(self, *modules: torch.nn.Module | None) -> Iterator[None]:
        """``modules`` are on ``device`` inside the block (offload: moved there, and back to the CPU after)."""
        moved = [m for m in modules if m is not None] if self.offload else []
        for m in moved:
            self.move(m, self.device)
        try:
            yield
        finally:
            for m in moved:
                self.move(m, CPU)
            if moved and self.device.type == "cuda":
                torch.cuda.empty_cache()
