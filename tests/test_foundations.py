import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hi3d import cameras as C
from hi3d.cli import main as hi3d_main
from hi3d.config import load_config, to_dict
from hi3d.data.orbit import Orbit, concat_orbits, load_orbit, save_orbit
from hi3d.errors import ConfigError, Hi3DError
from hi3d.io import atomic_path, contact_sheet, load_png, save_png
from hi3d.provenance import RunRecord
from hi3d.threads import cpu_threads


@dataclasses.dataclass
class Optim:
    lr: float = 1e-4
    warmup_steps: int = 0


@dataclasses.dataclass
class Job:
    num_views: int = 16
    name: str = "x"
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_config_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("num_views: 8\noptim:\n  lr: 0.5\n")
    cfg = load_config(Job, y, ["optim.warmup_steps=3"])
    assert cfg == Job(num_views=8, optim=Optim(lr=0.5, warmup_steps=3))
    assert to_dict(cfg)["optim"]["lr"] == 0.5


@pytest.mark.parametrize("override, expect", [
    ("num_view=3", "unknown config key 'num_view'.*did you mean 'num_views'"),
    ("optim.lrr=1", "unknown config key 'optim.lrr'.*did you mean 'optim.lr'"),
    ("num_views=many", "config key 'num_views'.*expects int"),
    ("novel", "not of the form key=value"),
])
def test_config_errors_name_the_key(override, expect):
    with pytest.raises(ConfigError, match=expect):
        load_config(Job, None, [override])


def test_config_yaml_unknown_key_names_file(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("optim:\n  warmup_step: 3\n")
    with pytest.raises(ConfigError, match=r"optim.warmup_step.*bad.yaml.*optim.warmup_steps"):
        load_config(Job, y)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Job, tmp_path / "missing.yaml")


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_png_roundtrip_and_contact_sheet(tmp_path):
    g = torch.Generator().manual_seed(0)
    im = torch.rand(8, 6, 4, generator=g)
    save_png(tmp_path / "x.png", im)
    back = load_png(tmp_path / "x.png")
    assert back.shape == (8, 6, 4) and (back - im).abs().max() <= 0.5 / 255 + 1e-6
    sheet = contact_sheet([im] * 5, cols=3, pad=2)
    assert sheet.shape == (2 * 10 + 2, 3 * 8 + 2, 3)
    assert torch.all(sheet[-9:, -7:] == 1.0)  # the empty sixth cell stays white


def _orbit(n=4, h=8, w=10) -> Orbit:
    g = torch.Generator().manual_seed(1)
    c2w, az, el = C.orbit_poses(n, 15.0)
    rgba = torch.rand(n, h, w, 4, generator=g)
    rgba[..., 3] = (rgba[..., 3] > 0.5).float()
    return Orbit(rgba=rgba, c2w=c2w, K=C.intrinsics(w, h).expand(n, 3, 3).clone(), azimuth_deg=az,
                 elevation_deg=el, radius=torch.full((n,), 1.5, dtype=torch.float64),
                 depth=torch.rand(n, h, w, generator=g))


def test_orbit_save_load_roundtrip(tmp_path):
    o = _orbit()
    save_orbit(o, tmp_path)
    back = load_orbit(tmp_path)
    assert len(back) == 4 and (back.rgba - o.rgba).abs().max() <= 0.5 / 255 + 1e-6
    torch.testing.assert_close(back.c2w, o.c2w)
    torch.testing.assert_close(back.depth, o.depth)
    assert (tmp_path / "contact_sheet.png").is_file()
    both = concat_orbits(back, back.select([0, 2]))
    assert len(both) == 6 and both.azimuth_deg[4] == back.azimuth_deg[0]


def test_orbit_load_errors(tmp_path):
    with pytest.raises(Hi3DError, match="no cameras.json"):
        load_orbit(tmp_path)
    save_orbit(_orbit(), tmp_path)
    save_png(tmp_path / "rgba" / "002.png", torch.zeros(5, 5, 4))
    with pytest.raises(Hi3DError, match="inconsistent image sizes"):
        load_orbit(tmp_path)
    (tmp_path / "rgba" / "002.png").unlink()
    with pytest.raises(Hi3DError, match="missing"):
        load_orbit(tmp_path)


def test_run_record_writes_stages_and_versions(tmp_path):
    rec = RunRecord(tmp_path, "test", config=Job(), seed=3)
    with rec.stage("one") as entry:
        entry["views"] = 2
        with cpu_threads(2), cpu_threads(1):  # e.g. a texture bake inside the mesh stage
            pass
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "m.safetensors").write_bytes(b"abc")
    rec.add_weights(tmp_path / "w")
    rec.finish()
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["seed"] == 3 and data["config"]["optim"]["lr"] == 1e-4
    assert data["stages"]["one"]["views"] == 2 and data["stages"]["one"]["wall_time_s"] >= 0
    assert data["stages"]["one"]["cpu_max_rss_mb"] > 0
    used = data["stages"]["one"]["cpu_threads"]  # the inner context ends first
    assert [(u["requested"], [n for _, n in u["threads"]]) for u in used] == [(1, [1]), (2, [2])]
    assert data["versions"]["torch"] == torch.__version__.split("+")[0] or data["versions"]["torch"]
    assert data["weights"][str(tmp_path / "w")]["m.safetensors"].startswith("ba7816bf")  # sha256("abc")
    assert data["end_time"] is not None


def test_cli_unknown_command_and_help(capsys):
    assert hi3d_main(["--help"]) == 0
    assert "render-orbit" in capsys.readouterr().out
    assert hi3d_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_console_script_installed():
    exe = Path(sys.executable).parent / "hi3d"
    if not exe.exists():
        from conftest import missing_fixture

        missing_fixture(f"hi3d console script ({exe}) not installed: pip install -e . (scripts/bootstrap.sh does)")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "commands:" in out.stdout
