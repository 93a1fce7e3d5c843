"""``hi3d`` console script: ``hi3d <command> [args]``.

Each command lives in its own module, exposing ``cli(argv: list[str]) -> int | None``; modules are
imported only when their command runs. A ``Hi3DError`` is printed as one line and exits with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "render-orbit": ("hi3d.data.render", "render orbit views of a mesh (RGBA, depth, normals, cameras)"),
    "degrade": ("hi3d.data.degradation", "write Real-ESRGAN-style degraded frames of an orbit"),
    "interpolate": ("hi3d.recon.interpolate", "fit 3DGS to an orbit and render M interpolated views"),
    "reconstruct": ("hi3d.recon.reconstruct", "orbit -> 3DGS interpolation -> NeuS -> mesh"),
    "demo": ("hi3d.recon.demo", "render a real object, reconstruct it, print Chamfer and IoU"),
    "evaluate": ("hi3d.eval.commands", "score meshes or views against ground truth (JSON)"),
    "generate": ("hi3d.pipelines.generate", "image or text -> 3D mesh through both stages"),
    "check-weights": ("hi3d.pipelines.weights", "verify a weights folder before a long run"),
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config YAML`` and trailing ``key=value`` overrides, for commands with a typed config."""
    parser.add_argument("--config", default=None, help="YAML file merged onto the defaults")
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides")


def main(argv: list[str] | None = None) -> int:
    from hi3d.errors import Hi3DError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: hi3d <command> [args]\n\ncommands:\n{lines}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"hi3d: error: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.cli(rest) or 0)
    except Hi3DError as e:
        print(f"hi3d {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hi3d {name}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
