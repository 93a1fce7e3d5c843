"""Image (or text) -> textured mesh through stage 1, stage 2, the 3DGS interpolator and NeuS.

``generate_one(source, out_dir, cfg)`` writes, for each seed ``s`` (``out_dir/seed_<s>/`` when
``num_seeds > 1``, else ``out_dir/``):

```
input.png            the exact image stage 1 sees (framed by inputs.framing, on white, stage-1 resolution)
input_mask.png       the object mask used, beside it (text inputs: text_image.png is the generated image)
stage1/              orbit folder: 16 frames at the stage-1 resolution (alpha from the white background)
depth/NNN.png        per-frame min-max normalised depth of the stage-1 frames (stage 2's condition)
stage2/              orbit folder: refined frames at the stage-2 resolution (or bicubic / stage-1 copies)
recon/               hi3d reconstruct output: interp/ (M views), mesh.glb/.obj/.ply, turntable.png
elevation.json       with --elevation auto (in out_dir, shared by all seeds): guess, estimate, elevation used,
                     score curves; elevation_probe/round_K/ the stage-1 orbits the estimates were made from
contact_sheet.png    stage-1 row, stage-2 row
run.json             config, seed, weight hashes, versions, per-stage time and peak memory
```
Each stage is skipped when its output is complete (an orbit folder's ``cameras.json`` is written last),
so re-running resumes after the last finished stage. ``stages`` stops after any stage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from hi3d.data.orbit import Orbit, load_orbit, save_orbit
from hi3d.devices import resolve_device, resolve_dtype
from hi3d.errors import Hi3DError
from hi3d.io import contact_sheet, load_png, read_json, save_png, write_json
from hi3d.pipelines.elevation import ElevationConfig, auto_elevation
from hi3d.pipelines.inputs import InputConfig, load_input, to_rgba
from hi3d.pipelines.preprocess import frame_object
from hi3d.pipelines.text_to_image import TextToImageConfig
from hi3d.recon.reconstruct import ReconstructConfig, resolve_devices, stage_devices

STAGES = ("stage1", "stage2", "interpolate", "mesh")
# stage 2 and its ablations (paper Table 3, appendix): the refiner; no stage 2 (the stage-1 frames as they are);
# the refiner with zero depth channels; bicubic or Real-ESRGAN x4 upscaling to the stage-2 resolution
STAGE2_MODES = ("full", "none", "no_depth", "bicubic", "realesrgan")


@dataclasses.dataclass
class GenerateConfig:
    weights: str | None = None  # folder laid out as in hi3d.pipelines.weights
    elevation: float = 20.0  # degrees, camera elevation of the input view (ignored with auto_elevation.enabled)
    seed: int = 0
    num_seeds: int = 1  # seeds seed, seed+1, ...: one orbit and mesh each
    num_interp: int = 16  # M interpolated views for NeuS (0 = plain NeuS)
    stages: str = "mesh"  # stop after: stage1 | stage2 | interpolate | mesh
    stage2: str = "full"  # one of STAGE2_MODES: full | none | no_depth | bicubic | realesrgan
    realesrgan_weights: str = ""  # stage2=realesrgan: RealESRGAN_x4plus.pth (default WEIGHTS/realesrgan/RealESRGAN_x4plus.pth)
    device: str = "auto"  # auto | cpu | cuda | cuda:N: every stage's (recon.device etc. override it per stage)
    dtype: str = "float32"  # float32 | float16 | bfloat16 (GPU): both diffusion stages; reconstruction is float32
    low_memory: bool = False  # on an accelerator: chunked VAE, one UNet pass at a time, models offloaded to the CPU
    stage1_steps: int = 25
    stage2_steps: int = 25
    background_threshold: float = 0.04  # generated frames: max-channel distance from white that is object
    auto_elevation: ElevationConfig = dataclasses.field(default_factory=ElevationConfig)  # --elevation auto
    inputs: InputConfig = dataclasses.field(default_factory=InputConfig)
    text: TextToImageConfig = dataclasses.field(default_factory=TextToImageConfig)
    recon: ReconstructConfig = dataclasses.field(default_factory=ReconstructConfig)


def white_background_rgba(frames: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] on white -> ``[N, H, W, 4]`` with alpha = pixels farther than
    ``threshold`` from white (max over channels)."""
    rgb = frames.permute(0, 2, 3, 1).float()
    alpha = ((1.0 - rgb).amax(-1) > threshold).float()
    return torch.cat([rgb, alpha[..., None]], -1)


def realesrgan_path(cfg: GenerateConfig) -> Path:
    """The Real-ESRGAN checkpoint of ``stage2=realesrgan``."""
    from hi3d.models.rrdbnet import REALESRGAN_FILE

    if cfg.realesrgan_weights:
        return Path(cfg.realesrgan_weights)
    return Path(cfg.weights or ".") / "realesrgan" / REALESRGAN_FILE


def check_stage2(cfg: GenerateConfig) -> None:
    """Start-up errors: an unknown stage-2 mode, or ``realesrgan`` without its checkpoint file."""
    if cfg.stage2 not in STAGE2_MODES:
        raise Hi3DError(f"stage2='{cfg.stage2}' is not one of {', '.join(STAGE2_MODES)}")
    if cfg.stage2 == "realesrgan" and not realesrgan_path(cfg).is_file():
        from hi3d.models.rrdbnet import load_realesrgan

        load_realesrgan(realesrgan_path(cfg))  # raises the one-line error naming the file


def _orbit_done(path: Path) -> Orbit | None:
    return load_orbit(path, load_depth=False) if (path / "cameras.json").is_file() else None


class ImageTo3D:
    """Holds the loaded models; ``run(rgba, out_dir, seed)`` makes one object. Models load on first use."""

    def __init__(self, cfg: GenerateConfig):
        if cfg.stages not in STAGES:
            raise Hi3DError(f"stages='{cfg.stages}' is not one of {', '.join(STAGES)}")
        check_stage2(cfg)
        self.device = resolve_device(cfg.device)  # start-up: a device this machine lacks fails here, before any output
        self.dtype = resolve_dtype(cfg.dtype)
        self.cfg = cfg = dataclasses.replace(cfg, recon=resolve_devices(cfg.recon, self.device))
        recon = {k: {"device": v, "dtype": "float32"} for k, v in stage_devices(cfg.recon).items()}
        self.devices = {"stage1": {"device": str(self.device), "dtype": cfg.dtype},
                        "stage2": {"device": str(self.device), "dtype": cfg.dtype, "low_memory": cfg.low_memory}, **recon}
        self.weights = Path(cfg.weights) if cfg.weights else None
        self._stage1 = self._stage2 = None

    def _folder(self, name: str) -> Path:
        if self.weights is None:
            raise Hi3DError("no weights folder: pass --weights DIR (layout in the README; check it with "
                            "`hi3d check-weights DIR`)")
        path = self.weights / name
        if not path.is_dir():
            raise Hi3DError(f"weights folder {self.weights} has no {name}/ (layout in the README; check it with "
                            f"`hi3d check-weights {self.weights}`)")
        return path

    @property
    def stage1(self):
        if self._stage1 is None:
            from hi3d.pipelines.orbit import OrbitPipeline

            pipe = OrbitPipeline.from_pretrained(self._folder("stage1"), torch_dtype=self.dtype).to(
                self.device, low_memory=self.cfg.low_memory)  # low_memory: stage 1 off the GPU while stage 2 runs
            if pipe.unet.config.in_channels != 8:
                raise Hi3DError(f"incompatible checkpoint shapes: {self._folder('stage1')}/unet takes "
                                f"{pipe.unet.config.in_channels} input channels, a stage-1 model takes 8 — is a stage-2 "
                                "model in stage1/? Re-convert with scripts/convert_checkpoint.py")
            self._stage1 = pipe
        return self._stage1

    @property
    def stage2(self):
        if self._stage2 is None:
            from hi3d.pipelines.refine import RefinePipeline

            self._stage2 = RefinePipeline.from_pretrained(
                self._folder("stage2"), torch_dtype=self.dtype, device=self.device,  # placement: from the config
                low_memory=self.cfg.low_memory, use_depth=self.cfg.stage2 != "no_depth")
        return self._stage2

    def stage1_input(self, rgba: torch.Tensor) -> torch.Tensor:
        """``rgba [H, W, 4]`` -> ``[R, R, 4]``: RGB = the image stage 1 sees (framed by ``cfg.inputs.framing`` at
        the stage-1 resolution, on white), alpha = the framed object mask."""
        pipe = self.stage1
        return frame_object(rgba, pipe.config.resolution, self.cfg.inputs.framing, pipe.config.object_fill,
                            with_mask=True).permute(1, 2, 0)

    def _stage1_orbit(self, rgba: torch.Tensor, elevation: float, seed: int) -> Orbit:
        rgb = self.stage1_input(rgba)[..., :3]  # at the resolution, opaque: the pipeline's framing leaves it as is
        result = self.stage1(torch.cat([rgb, torch.ones_like(rgb[..., :1])], -1), elevation, seeds=[seed],
                             num_inference_steps=self.cfg.stage1_steps)
        orbit = result.to_orbit(0)
        orbit.rgba = white_background_rgba(result.frames[0], self.cfg.background_threshold)
        orbit.source = ["generated"] * len(orbit)
        return orbit

    def input_elevation(self, rgba: torch.Tensor, out_dir: str | Path, seed: int, record) -> dict:
        """Elevation (degrees) to condition stage 1 on: ``cfg.elevation``, or with ``auto_elevation.enabled`` the
        estimate from stage-1 probe orbits (``hi3d.pipelines.elevation.auto_elevation``; probes kept in
        ``out_dir/elevation_probe/round_K/``), made once per input with ``seed`` and kept in
        ``out_dir/elevation.json`` so a resumed run reuses it. Returns ``{"elevation": used, "mode", ...}``."""
        ae, out = self.cfg.auto_elevation, Path(out_dir)
        if not ae.enabled:
            return {"elevation": self.cfg.elevation, "mode": "given"}
        path, probes = out / "elevation.json", out / "elevation_probe"

        def probe(k: int, elevation: float) -> torch.Tensor:
            orbit = _orbit_done(probes / f"round_{k}")
            if orbit is None or float(orbit.elevation_deg[0]) != elevation:
                orbit = self._stage1_orbit(rgba, elevation, seed)
                save_orbit(orbit, probes / f"round_{k}")
            return orbit.rgba

        with record.stage("elevation") as entry:
            done = read_json(path) if path.is_file() else None
            entry["skipped"] = done is not None
            if done is None:
                done = {"mode": "auto", **auto_elevation(probe, ae), "probe_seed": seed}
                write_json(path, done)
            entry.update({k: done[k] for k in ("guess", "estimate", "elevation", "rerun_stage1")})
        record.add(elevation=done)
        final = done["final_round"]
        return {**done, "probe_dir": None if final is None else str(probes / f"round_{final}")}

    def run(self, rgba: torch.Tensor, out_dir: str | Path, seed: int, record,
            elevation: dict | None = None) -> dict[str, Path]:
        """Make (or resume) one object from ``rgba [H, W, 4]``; ``record`` is the run's ``RunRecord``;
        ``elevation`` from ``input_elevation`` (default: ``cfg.elevation``)."""
        cfg, out = self.cfg, Path(out_dir)
        elevation = elevation or {"elevation": cfg.elevation}
        files: dict[str, Path] = {}
        stop = STAGES.index(cfg.stages)

        with record.stage(f"stage1/seed_{seed}", self.device) as entry:
            s1 = _orbit_done(out / "stage1")
            if s1 is None or not (out / "input.png").is_file():
                framed = self.stage1_input(rgba)
                save_png(out / "input_mask.png", framed[..., 3])
                save_png(out / "input.png", framed[..., :3])
            entry["framing"] = cfg.inputs.framing
            entry["skipped"] = s1 is not None
            if s1 is None:
                # the probe orbit is this seed's stage-1 output when the estimate kept the guess
                probe = elevation.get("probe_dir")
                if elevation.get("probe_seed") == seed and not elevation.get("rerun_stage1", True) and probe:
                    s1 = _orbit_done(Path(probe))
                entry["from_probe"] = s1 is not None
                s1 = s1 or self._stage1_orbit(rgba, float(elevation["elevation"]), seed)
                save_orbit(s1, out / "stage1")
        files["stage1"] = out / "stage1"
        if stop == 0:
            return files

        with record.stage(f"stage2/seed_{seed}", self.device) as entry:
            s2 = _orbit_done(out / "stage2")
            entry["skipped"] = s2 is not None
            entry["mode"] = cfg.stage2
            if s2 is None:
                s2 = self._refine(s1, seed, out)
                save_orbit(s2, out / "stage2")
        files["stage2"] = out / "stage2"
        sheet = out / "contact_sheet.png"
        if not sheet.is_file():
            n = len(s1)
            small = torch.nn.functional.interpolate(s2.rgba.permute(0, 3, 1, 2), size=s1.rgba.shape[1:3],
                                                    mode="bilinear", antialias=True).permute(0, 2, 3, 1)
            save_png(sheet, contact_sheet(list(s1.rgba) + list(small), cols=n))
        files["contact_sheet"] = sheet
        if stop == 1:
            return files

        from hi3d.recon.reconstruct import reconstruct

        with record.stage(f"reconstruct/seed_{seed}", cfg.recon.neus.device) as entry:
            entry["num_interp"] = cfg.num_interp
            entry["stages"] = {k: v["device"] for k, v in self.devices.items() if k not in ("stage1", "stage2")}
            if stop == 2:  # interpolation only
                from hi3d.recon.interpolate import interpolate_views

                if not (out / "recon" / "interp" / "cameras.json").is_file():
                    save_orbit(interpolate_views(s2, cfg.num_interp, cfg.recon.gaussians), out / "recon" / "interp")
                files["interp"] = out / "recon" / "interp"
                return files
            files.update(reconstruct(out / "stage2", out / "recon", cfg.num_interp, cfg.recon, progress=False))
            recon_run = read_json(out / "recon" / "run.json")["stages"]  # what each reconstruction stage ran on
            entry["stages"] = {k: recon_run[k].get("device") for k in ("interpolate", "neus", "mesh") if k in recon_run}
        return files

    def _refine(self, s1: Orbit, seed: int, out: Path) -> Orbit:
        """Stage 2 (or its ablation baselines) on the stage-1 orbit; writes the depth maps it conditions on."""
        cfg = self.cfg
        frames = s1.rgb_on_white().permute(0, 3, 1, 2)
        if cfg.stage2 == "none":
            refined, scale = frames, 1
        else:
            pipe = self.stage2
            size = pipe.config.resolution
            scale = size / s1.width
            if cfg.stage2 == "bicubic":
                from hi3d.pipelines.refine import upsample

                refined = upsample(frames[None], size, "bicubic")[0]
            elif cfg.stage2 == "realesrgan":
                from hi3d.models.rrdbnet import load_realesrgan, upscale

                refined = upscale(load_realesrgan(realesrgan_path(cfg), self.device), frames, size)
            else:
                if cfg.stage2 == "full":
                    from hi3d.models.depth import normalise_per_frame

                    with torch.no_grad(), pipe.placement.use(pipe.depth):
                        depth = normalise_per_frame(pipe.depth.predict(frames.to(pipe.device)).cpu())
                    for i, d in enumerate(depth):
                        save_png(out / "depth" / f"{i:03d}.png", d[..., None])
                framed = out / "input.png"  # stage 1 keeps its sampled frame 0; stage 2 pastes the input
                image = load_png(framed)[..., :3].permute(2, 0, 1) if framed.is_file() else None
                refined = pipe(frames, float(s1.elevation_deg[0]), image=image, seed=seed,
                               num_inference_steps=cfg.stage2_steps)
        rgba = white_background_rgba(refined, cfg.background_threshold)
        K = s1.K.clone()
        K[:, :2] *= scale
        return dataclasses.replace(s1, rgba=rgba, K=K, source=[f"stage2-{cfg.stage2}"] * len(s1))


def prompt_image(prompt: str, cfg: GenerateConfig, weights: Path, out: Path, seed: int) -> torch.Tensor:
    """Text -> RGBA object image through the local text-to-image model (cached as ``out/text_image.png``)."""
    from hi3d.pipelines.text_to_image import load_text_to_image, text_to_image

    path = out / "text_image.png"
    if not path.is_file():
        device = resolve_device(cfg.device)
        pipe = load_text_to_image(weights / "text_to_image", device)
        save_png(path, text_to_image(pipe, prompt, cfg.text, torch.Generator(device).manual_seed(seed)))
    return to_rgba(load_png(path)[..., :3], _input_config(cfg), name=prompt)


def _input_config(cfg: GenerateConfig) -> InputConfig:
    """``cfg.inputs`` with ``WEIGHTS/background_removal`` as the model when none is given and it exists."""
    inputs = cfg.inputs
    if inputs.background_removal is None and cfg.weights and (Path(cfg.weights) / "background_removal").is_dir():
        inputs = dataclasses.replace(inputs, background_removal=str(Path(cfg.weights) / "background_removal"))
    return inputs


def input_rgba(source: str | Path, cfg: GenerateConfig) -> torch.Tensor:
    return load_input(source, _input_config(cfg))
