"""hi3d: image-to-3D with video diffusion models (Hi3D, arXiv:2409.07452)."""

__version__ = "0.1.0"
