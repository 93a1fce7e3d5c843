"""``low_memory`` placement: where each component lives at each step, on a fake accelerator (moves recorded,
tensors kept on the CPU), and that the runner hands the requested device to both pipelines."""


import pytest
import torch

from hi3d.models.depth import DepthConfig
from hi3d.models.stage1 import Stage1Config, TinyConfig
from hi3d.models.stage1 import tiny_components as stage1_components
from hi3d.models.stage2 import Stage2Config
from hi3d.models.stage2 import tiny_components as stage2_components
from hi3d.pipelines.orbit import OrbitPipeline
from hi3d.pipelines.placement import CPU, Placement
from hi3d.pipelines.refine import RefinePipeline

ACCEL = torch.device("cuda")


class FakeAccelerator(Placement):
    """Decides as for a CUDA request; a move only records the component's new place; tensors stay on the CPU."""

    def __init__(self, device, offload=False):
        super().__init__(device, offload)
        self.where: dict[int, str] = {}

    @property
    def compute_device(self):
        return CPU

    def move(self, module, device, dtype=None):
        module.to(dtype=dtype)
        self.where[id(module)] = str(torch.device(device))


def record_runs(pipe, placement):
    """Forward pre-hooks: ``runs`` gets ``(component that runs, {component: where it lives})`` at each call."""
    names = [n for n in pipe.component_names() if isinstance(getattr(pipe, n), torch.nn.Module)]
    runs = []

    def snapshot(name):
        return lambda *_: runs.append((name, {n: placement.where.get(id(getattr(pipe, n))) for n in names}))

    for n in names:
        m = getattr(pipe, n)
        parts = [m.encoder, m.decoder] if n == "vae" else [m]  # the VAE runs through encode/decode, not forward
        for part in parts:
            part.register_forward_pre_hook(snapshot(n))
    return runs, names


def stage2_pipe(low_memory):
    cfg = Stage2Config(num_frames=3, resolution=32, num_inference_steps=2, tiny=TinyConfig(enabled=True),
                       depth=DepthConfig(input_size=32), low_memory=low_memory, decode_chunk_size=2)
    return RefinePipeline.from_components(stage2_components(cfg), cfg)


def stage1_pipe():
    cfg = Stage1Config(num_frames=3, resolution=32, num_inference_steps=2, tiny=TinyConfig(enabled=True))
    return OrbitPipeline.from_components(stage1_components(cfg), cfg)


def refine(pipe):
    frames = torch.rand(1, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return pipe.refine(frames, torch.tensor([10.0]), generator=torch.Generator().manual_seed(0))


def generate(pipe):
    return pipe.generate(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), 20.0,
                         torch.Generator().manual_seed(0))


def test_decision_follows_the_requested_device():
    assert Placement.decide("cuda:1", low_memory=True).offload and Placement.decide("cuda", True).home == CPU
    assert not Placement.decide("cpu", low_memory=True).offload  # nothing to offload from on a CPU
    assert not Placement.decide("cuda", low_memory=False).offload
    assert Placement.decide("cuda", False).home == ACCEL


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_low_memory_moves_each_component_onto_the_accelerator_only_while_it_runs(stage):
    pipe, run = (stage2_pipe(True), refine) if stage == "stage2" else (stage1_pipe(), generate)
    expected = run(pipe)
    fake = FakeAccelerator.decide(ACCEL, low_memory=True)
    pipe.place(fake)
    runs, names = record_runs(pipe, fake)
    assert set(fake.where.values()) == {"cpu"}  # placed: everything on the CPU
    out = run(pipe)
    assert {n for n, _ in runs} == set(names), "every component ran"
    for name, where in runs:
        assert where[name] == "cuda", (name, where)  # the component that runs is on the accelerator ...
        if name == "unet":  # ... and while the UNet samples, nothing else is
            assert all(where[n] == "cpu" for n in names if n != "unet"), where
        else:
            assert where["unet"] == "cpu", (name, where)
    assert set(fake.where.values()) == {"cpu"}  # back on the CPU afterwards
    torch.testing.assert_close(out, expected)  # placement changes where, not what


def test_resident_placement_keeps_every_component_on_the_accelerator():
    pipe = stage2_pipe(False)
    fake = FakeAccelerator.decide(ACCEL, low_memory=False)
    pipe.place(fake)
    runs, names = record_runs(pipe, fake)
    refine(pipe)
    assert runs and all(set(where.values()) == {"cuda"} for _, where in runs)


def test_runner_hands_the_requested_device_to_both_pipelines(tmp_path):
    """``ImageTo3D`` with ``low_memory``: both pipelines run on the requested device (``meta`` stands in for an
    accelerator this machine lacks) with their weights on the CPU; without it they live on that device."""
    from hi3d.pipelines.image_to_3d import GenerateConfig, ImageTo3D
    from hi3d.testing import save_tiny_weights

    weights = save_tiny_weights(tmp_path / "w")
    for low_memory in (True, False):
        runner = ImageTo3D(GenerateConfig(weights=str(weights), device="meta", low_memory=low_memory))
        for pipe in (runner.stage1, runner.stage2):
            assert pipe.device == torch.device("meta") and pipe.placement.offload == low_memory
            assert {p.device.type for m in pipe.modules() for p in m.parameters()} == {"cpu" if low_memory else "meta"}
