"""``hi3d evaluate mesh --pred P --gt G [--protocol syncdreamer|uniform]``, ``hi3d evaluate views --pred DIR
--gt DIR [--protocol ...]`` and ``hi3d evaluate clip --views DIR --image I|--prompt T --weights W``: scores
printed as JSON. Protocols: see ``hi3d.eval.gso`` (syncdreamer: the published tables' definitions)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hi3d.errors import Hi3DError


def evaluate_mesh(args) -> dict:
    from hi3d.eval.gso import GSOConfig, check_config, score_mesh

    uniform = {"align": args.align, "num_points": args.num_points, "iou_resolution": args.iou_resolution,
               "fscore_threshold": args.fscore_threshold, "seed": args.seed}
    cfg = GSOConfig(protocol=args.protocol, mesh_frame=args.frame,
                    **({k: v for k, v in uniform.items() if v is not None} if args.protocol == "uniform" else {}))
    if args.protocol != "uniform" and any(v is not None for v in uniform.values()):
        raise Hi3DError(f"--{next(k for k, v in uniform.items() if v is not None).replace('_', '-')} applies to "
                        f"--protocol uniform only")
    check_config(cfg)
    return {"protocol": args.protocol, **score_mesh(Path(args.pred), Path(args.gt), cfg, args.gt_name)}


def evaluate_views(args) -> dict:
    from hi3d.data.orbit import load_orbit
    from hi3d.eval import metrics, syncdreamer
    from hi3d.eval.gso import resize_views

    pred, gt = load_orbit(args.pred, load_depth=False), load_orbit(args.gt, load_depth=False)
    if len(pred) != len(gt):
        raise Hi3DError(f"{args.pred} has {len(pred)} views, {args.gt} has {len(gt)}")
    lpips_model = metrics.LPIPS(args.lpips, args.lpips_weights) if args.lpips.lower() not in ("", "none") else None
    score = syncdreamer.view_metrics if args.protocol == "syncdreamer" else metrics.view_metrics
    out = score(resize_views(pred.rgb_on_white(), gt.height), gt.rgb_on_white(), lpips_model)
    return {"protocol": args.protocol, **out, "views": len(gt), "resolution": gt.height}


def evaluate_clip(args) -> dict:
    from hi3d.data.orbit import load_orbit
    from hi3d.eval import metrics
    from hi3d.io import load_png, rgba_on_white

    if (args.image is None) == (args.prompt is None):
        raise Hi3DError("give exactly one of --image or --prompt")
    scorer = metrics.ClipScorer.from_pretrained(args.model, args.weights)
    views = load_orbit(args.views, load_depth=False).rgb_on_white()
    if args.image is not None:
        im = load_png(args.image)
        ref = rgba_on_white(im) if im.shape[-1] == 4 else im[..., :3].expand(*im.shape[:2], 3)
    else:
        ref = args.prompt
    sims = scorer.similarity(ref, views)
    return {"clip_similarity": float(sims.mean()), "per_view": sims.tolist(), "model": args.model}


def cli(argv: list[str]) -> int:
    from hi3d.eval.gso import MESH_FRAMES, PROTOCOLS
    from hi3d.eval.metrics import ALIGN_MODES, DEFAULT_POINTS, IOU_RESOLUTION

    p = argparse.ArgumentParser(prog="hi3d evaluate", description="score meshes or views against ground truth")
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("mesh", help="Chamfer, volume IoU, F-score of a predicted mesh against a GT mesh")
    m.add_argument("--pred", required=True, help="predicted mesh file")
    m.add_argument("--gt", required=True, help="ground-truth mesh file (GSO layout <name>/meshes/model.obj or any)")
    m.add_argument("--protocol", default="syncdreamer", choices=PROTOCOLS,
                   help="syncdreamer (the published tables' protocol) or uniform (hi3d's surface sampling)")
    m.add_argument("--gt-name", help="syncdreamer: object name for the GT turn table (default: from the --gt path)")
    m.add_argument("--frame", default="recorded", choices=MESH_FRAMES,
                   help="coordinates of --pred when no mesh.frame.json is beside it: world, syncdreamer, gt (the GT "
                        "file's), axis, normalize (see hi3d.eval.gso); recorded: require the record")
    m.add_argument("--align", default=None, choices=ALIGN_MODES, help="uniform: none (same pose, default) or icp")
    m.add_argument("--num-points", type=int, help=f"uniform: surface samples (default {DEFAULT_POINTS})")
    m.add_argument("--iou-resolution", type=int, help=f"uniform: IoU grid (default {IOU_RESOLUTION})")
    m.add_argument("--fscore-threshold", type=float, help="uniform: F-score distance (default 0.05)")
    m.add_argument("--seed", type=int, help="uniform: sampling seed (default 0)")
    v = sub.add_parser("views", help="PSNR, SSIM, LPIPS of predicted views against GT views (orbit folders)")
    v.add_argument("--pred", required=True, help="orbit folder of predicted views")
    v.add_argument("--gt", required=True, help="orbit folder of ground-truth views (same cameras)")
    v.add_argument("--protocol", default="syncdreamer", choices=PROTOCOLS,
                   help="syncdreamer (float PSNR, torchmetrics SSIM) or uniform (hi3d's PSNR/SSIM)")
    v.add_argument("--lpips", default="vgg", help="vgg | alex | none (skip LPIPS)")
    v.add_argument("--lpips-weights", default=None, help="torchvision backbone file (default: torch hub cache)")
    c = sub.add_parser("clip", help="CLIP similarity of views to an input image or a prompt (no ground truth)")
    c.add_argument("--views", required=True, help="orbit folder of views")
    c.add_argument("--image", help="reference image (the input)")
    c.add_argument("--prompt", help="reference text (text-to-3D)")
    c.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    c.add_argument("--weights", required=True, help="local open_clip checkpoint file for --model")
    args = p.parse_args(argv)
    for key in ("pred", "gt", "views", "image"):
        if getattr(args, key, None) is not None and not Path(getattr(args, key)).exists():
            raise Hi3DError(f"--{key} not found: {getattr(args, key)}")
    result = {"mesh": evaluate_mesh, "views": evaluate_views, "clip": evaluate_clip}[args.what](args)
    print(json.dumps(result, indent=2))
    return 0
