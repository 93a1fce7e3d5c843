"""Devices and dtypes from config strings: one resolution rule for every command and stage.

A command sets ``device`` once (``auto | cpu | cuda | cuda:N``); a stage whose own ``device`` is ``None``
inherits it, a stage that sets one overrides it. A CUDA device on a machine without CUDA is refused here,
at start-up, before any stage writes output.
"""

from __future__ import annotations

import torch

from hi3d.errors import Hi3DError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | None, inherit: torch.device | str | None = None) -> torch.device:
    """``name`` (``None`` = ``inherit``, itself ``None`` = ``auto``) -> a device that exists on this machine."""
    if name is None:
        return resolve_device(str(inherit) if inherit is not None else "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise Hi3DError(f"device '{name}' is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Hi3DError(f"device '{name}' requested but CUDA is not available on this machine (use device=cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise Hi3DError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise Hi3DError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]
