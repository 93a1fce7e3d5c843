#!/usr/bin/env python
"""Orbit renderer speed: views/s at 256² and 512² for real meshes (bunny, spider), run by hand.

    python scripts/benchmarks/render.py [--views 16] [--repeats 2] [--out outputs/benchmarks]

Per mesh and resolution: one orbit of ``--views`` views through ``render_views`` (scene set-up
included, as a user pays it), best of ``--repeats`` after a warm-up, with and without the depth pass.
Baselines measured in the same run: the time to load and normalise the mesh (``load_mesh``), and for
512² the 256² speed. Writes ``render.json`` and ``render.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

from hi3d import cameras  # noqa: E402
from hi3d.data.mesh_io import load_mesh  # noqa: E402
from hi3d.data.real_objects import REAL_OBJECTS  # noqa: E402
from hi3d.data.render import render_views  # noqa: E402
from hi3d.io import write_bytes, write_json  # noqa: E402

MESHES = {name: REAL_OBJECTS[name][0] for name in ("bunny", "spider")}


def best_of(fn, repeats: int) -> tuple[float, float]:
    """(best wall time, CPU time of that run, all threads incl. llvmpipe's) in seconds."""
    runs = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - start, time.process_time() - cpu))
    return min(runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="orbit renderer speed")
    p.add_argument("--views", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
    p.add_argument("--out", default="outputs/benchmarks")
    args = p.parse_args(argv)
    rows = []
    for name, path in MESHES.items():
        if not Path(path).is_file():
            print(f"skip {name}: {path} missing (apt-get install glmark2-data assimp-testmodels)")
            continue
        load_s = best_of(lambda: load_mesh(path), args.repeats)[0]
        scene, norm = load_mesh(path)
        faces = sum(len(g.faces) for g in scene.geometry.values())
        c2w, _, _ = cameras.orbit_poses(args.views, 20.0, 1.5)
        base = None
        for res in args.resolutions:
            K = cameras.intrinsics(res)
            render_views(scene, c2w[:1], K, res, res)  # warm-up: EGL context, shaders, framebuffers
            for depth in (True, False):
                t, cpu = best_of(lambda: render_views(scene, c2w, K, res, res, normalization=norm, with_depth=depth),
                            args.repeats)
                vps = args.views / t
                base = vps if base is None and depth else base
                rows.append({"mesh": name, "faces": faces, "resolution": res, "depth_pass": depth,
                             "views": args.views, "seconds": round(t, 3), "views_per_s": round(vps, 2),
                             "ms_per_view": round(1000 * t / args.views, 1),
                             "cpu_ms_per_view": round(1000 * cpu / args.views, 1), "load_mesh_s": round(load_s, 3),
                             "view_time_over_load_time": round(t / args.views / load_s, 3),
                             "speed_vs_first_resolution": round(vps / base, 3)})
                print(rows[-1])
    out = Path(args.out)
    meta = {"host": platform.node(), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json(out / "render.json", {"meta": meta, "results": rows})
    cols = ["mesh", "faces", "resolution", "depth_pass", "views_per_s", "ms_per_view", "cpu_ms_per_view",
            "view_time_over_load_time", "speed_vs_first_resolution"]
    head = "| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|\n"
    lines = ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    write_bytes(out / "render.md", (f"# render benchmark\n\n{meta}\n\n" + head + "\n".join(lines) + "\n").encode())
    print(f"wrote {out / 'render.json'} and {out / 'render.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
