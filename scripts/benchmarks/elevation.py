#!/usr/bin/env python
"""Error of ``--elevation auto`` (hi3d.pipelines.elevation) on rendered orbits of real objects, run by hand.

    python scripts/benchmarks/elevation.py [--resolution 256] [--guess 20] [--azimuths 0 90 200]
                                           [--objects bunny spider wuson duck engine] [--out outputs/benchmarks]

Ground-truth renders stand in for an ideal stage-1 generator: frames 1..15 at the guess g (azimuths
offset + k·22.5°), frame 0 at the true elevation e* in --elevations, at the same azimuth offset. As in
``hi3d generate``, frame 0 is re-framed to the training framing (``frame_object``, longer side 0.75 of the
image) and every frame's alpha comes from its distance to white (``white_background_rgba``). The error is
that of the elevation stage 1 ends up conditioned on (``auto_elevation``: later probes re-rendered at the
previous estimate, as the ideal generator would make them), beside the single-probe estimate. Per object:
mean / max absolute error over e* and azimuths, the e* = g cases, a sanity run with every frame at e*
(guess e*), the constant-g baseline (|e* - g|) measured on the same cases, and stage-1 runs per input.
The ideal-generator assumption: frames 1..15 orbit the object around its true upright axis. Writes
``elevation.json`` and ``elevation.md`` under ``--out``.

Objects: bunny (glmark2-data), spider, Wuson, duck (COLLADA sample) and 2CylinderEngine (glTF sample),
all from Debian's assimp-testmodels (BSD-3-clause as packaged; the non-BSD models are excluded upstream).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

import torch  # noqa: E402

from hi3d import cameras  # noqa: E402
from hi3d.config import load_config, to_dict  # noqa: E402
from hi3d.data.mesh_io import load_mesh  # noqa: E402
from hi3d.data.real_objects import REAL_OBJECTS  # noqa: E402
from hi3d.data.render import render_views  # noqa: E402
from hi3d.io import write_bytes, write_json  # noqa: E402
from hi3d.pipelines.elevation import ElevationConfig, auto_elevation, estimate_elevation  # noqa: E402
from hi3d.pipelines.image_to_3d import white_background_rgba  # noqa: E402
from hi3d.pipelines.preprocess import frame_object  # noqa: E402


def as_generated(rgba: torch.Tensor, reframe: bool, threshold: float = 0.04) -> torch.Tensor:
    """Rendered ``[N, H, W, 4]`` -> what ``hi3d generate`` sees: on white, alpha by distance from white;
    with ``reframe`` each frame re-framed like the input (only frame 0 is passed with it)."""
    rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    if reframe:
        size = rgba.shape[1]
        rgb = torch.stack([frame_object(torch.cat([c, a[..., None]], -1), size, "refit")
                           for c, a in zip(rgb, rgba[..., 3])]).permute(0, 2, 3, 1)
    return white_background_rgba(rgb.permute(0, 3, 1, 2), threshold)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="elevation estimation error on rendered orbits")
    p.add_argument("--objects", nargs="+", default=list(REAL_OBJECTS))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--guess", type=float, default=20.0)
    p.add_argument("--elevations", type=float, nargs="+", default=[-10, 0, 10, 20, 30, 40])
    p.add_argument("--azimuths", type=float, nargs="+", default=[0, 90, 200])
    p.add_argument("--views", type=int, default=16)
    p.add_argument("--no-reframe", action="store_true", help="keep frame 0 at the render's framing")
    p.add_argument("--no-sanity", action="store_true", help="skip the every-frame-at-e* runs")
    p.add_argument("--shift", type=int, default=0,
                   help="imperfect generator: frames 1..N-1 each shifted by a random offset up to this many pixels")
    p.add_argument("--seed", type=int, default=0, help="of the --shift offsets")
    p.add_argument("--out", default="outputs/benchmarks")
    p.add_argument("overrides", nargs="*", help="ElevationConfig key=value (guess: --guess)")
    args = p.parse_args(argv)
    cfg = load_config(ElevationConfig, None, args.overrides)
    res, g, N = args.resolution, args.guess, args.views
    K = cameras.intrinsics(res)
    es = torch.tensor(args.elevations, dtype=torch.float64)
    cases, per_object, seconds = [], {}, []
    gen = torch.Generator().manual_seed(args.seed)

    def shift(rgba: torch.Tensor) -> torch.Tensor:
        """Each frame rolled by its own random offset in [-shift, shift]² pixels, filled with white."""
        if not args.shift:
            return rgba
        out = torch.ones_like(rgba)
        out[..., 3] = 0
        for i, (dy, dx) in enumerate(torch.randint(-args.shift, args.shift + 1, (len(rgba), 2), generator=gen)):
            dy, dx = int(dy), int(dx)
            src = rgba[i, max(0, -dy):res - max(0, dy), max(0, -dx):res - max(0, dx)]
            out[i, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
        return out
    for name in args.objects:
        path, package = REAL_OBJECTS[name]
        if not Path(path).is_file():
            print(f"skip {name}: {path} missing (apt-get install {package})")
            continue
        scene, _ = load_mesh(path)
        for off in args.azimuths:
            az = cameras.orbit_azimuths(N, off)
            def ring(elevation: float) -> torch.Tensor:  # the ideal generator's frames 1..N-1
                c2w = cameras.orbit_c2w(az[1:], torch.full((N - 1,), float(elevation)))
                return shift(as_generated(render_views(scene, c2w, K, res, res, with_depth=False).rgba, False))

            at_guess = ring(g)
            firsts = as_generated(render_views(scene, cameras.orbit_c2w(az[:1].expand(len(es)), es), K, res, res,
                                               with_depth=False).rgba, not args.no_reframe)
            for e, first in zip(args.elevations, firsts):
                probe = lambda k, el: torch.cat([first[None], at_guess if k == 0 else ring(el)])  # noqa: E731
                start = time.perf_counter()
                found = auto_elevation(probe, dataclasses.replace(cfg, guess=g))
                seconds.append((time.perf_counter() - start) / len(found["rounds"]))
                one = found["rounds"][0]["estimate"]
                row = {"object": name, "azimuth": off, "true": e, "estimate": found["elevation"],
                       "error": found["elevation"] - e, "one_round_estimate": one, "one_round_error": one - e,
                       "stage1_runs": len(found["rounds"]) + found["rerun_stage1"],
                       "rounds": found["rounds"]}  # with each round's score curve
                est = found["elevation"]
                if not args.no_sanity:
                    row["sanity_estimate"] = estimate_elevation(torch.cat([first[None], ring(e)]), e, cfg)[0]
                    row["sanity_error"] = row["sanity_estimate"] - e
                cases.append(row)
                print(f"{name} az {off:5.1f} e* {e:5.1f}: estimate {est:5.1f}"
                      + (f" (sanity {row['sanity_estimate']:5.1f})" if "sanity_error" in row else ""), flush=True)

    def summary(rows):
        err = [abs(r["error"]) for r in rows]
        one = [abs(r["one_round_error"]) for r in rows]
        off = [abs(r["error"]) for r in rows if r["true"] != g]
        at_g = [abs(r["error"]) for r in rows if r["true"] == g]
        san = [abs(r["sanity_error"]) for r in rows if "sanity_error" in r]
        base = [abs(r["true"] - g) for r in rows]
        out = {"cases": len(rows), "mean_abs": statistics.mean(err), "max_abs": max(err),
               "median_abs": statistics.median(err), "one_round_mean_abs": statistics.mean(one),
               "one_round_max_abs": max(one), "mean_stage1_runs": statistics.mean(r["stage1_runs"] for r in rows),
               "mean_abs_true_ne_guess": statistics.mean(off) if off else None,
               "mean_abs_true_eq_guess": statistics.mean(at_g) if at_g else None,
               "max_abs_true_eq_guess": max(at_g) if at_g else None,
               "baseline_constant_guess_mean_abs": statistics.mean(base), "baseline_max_abs": max(base)}
        if san:
            out.update(sanity_mean_abs=statistics.mean(san), sanity_max_abs=max(san))
        return out

    for name in dict.fromkeys(r["object"] for r in cases):
        per_object[name] = summary([r for r in cases if r["object"] == name])
    overall = summary(cases)
    result = {"config": to_dict(cfg), "resolution": res, "guess": g, "elevations": args.elevations,
              "azimuths": args.azimuths, "reframe": not args.no_reframe, "shift": args.shift, "per_object": per_object,
              "overall": overall, "cases": cases, "seconds_per_estimate": statistics.mean(seconds),
              "host": platform.node(), "threads": torch.get_num_threads()}
    out = Path(args.out)
    write_json(out / "elevation.json", result)
    lines = [f"# --elevation auto: error on rendered orbits ({res}², guess {g:g}°, e* in "
             f"{', '.join(f'{e:g}' for e in args.elevations)}, "
             f"azimuth offsets {', '.join(f'{a:g}' for a in args.azimuths)}"
             f"{', frame 0 re-framed' if not args.no_reframe else ''}"
             f"{f', frames 1..{N - 1} shifted up to {args.shift} px' if args.shift else ''})", "",
             "| object | cases | mean abs (°) | median | max | one round mean / max | e*=g mean / max | "
             "sanity mean / max | constant-g baseline mean / max | stage-1 runs |", "|---" * 10 + "|"]
    for name, s in [*per_object.items(), ("**overall**", overall)]:
        san = f"{s['sanity_mean_abs']:.1f} / {s['sanity_max_abs']:.1f}" if "sanity_mean_abs" in s else "-"
        eq = (f"{s['mean_abs_true_eq_guess']:.1f} / {s['max_abs_true_eq_guess']:.1f}"
              if s["mean_abs_true_eq_guess"] is not None else "-")
        lines.append(f"| {name} | {s['cases']} | {s['mean_abs']:.1f} | {s['median_abs']:.1f} | {s['max_abs']:.1f} | "
                     f"{s['one_round_mean_abs']:.1f} / {s['one_round_max_abs']:.1f} | {eq} | {san} | "
                     f"{s['baseline_constant_guess_mean_abs']:.1f} / {s['baseline_max_abs']:.1f} | "
                     f"{s['mean_stage1_runs']:.2f} |")
    lines += ["", f"{statistics.mean(seconds):.2f} s per estimate ({torch.get_num_threads()} torch threads)"]
    write_bytes(out / "elevation.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
