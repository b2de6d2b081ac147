"""`ganflow generate`, `ganflow serve`, `ganflow rollback` and `ganflow models`: use, serve
and manage registered generators."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch


def _read_image(path: str, image_size: int, channels: int) -> torch.Tensor:
    """One image file -> [1, C, S, S] in [-1, 1], with the project's resize rule (bilinear)."""
    from PIL import Image, UnidentifiedImageError

    from flows.errors import UserError
    from gan_core.data import resize

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except FileNotFoundError:
        raise UserError(f"input image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot decode input image {path}: {exc}") from None
    t = torch.from_numpy(arr)
    t = t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)
    return resize(t.unsqueeze(0), image_size).clamp(-1, 1)


def cmd_generate(args: argparse.Namespace) -> dict:
    from mlflow.exceptions import MlflowException

    from flows.errors import UserError
    from flows.package import MAX_SAMPLES
    from flows.registry.models import load_registered_generator, parse_model_ref
    from gan_core.viz import save_grid

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name ending in .png or .npz")
    if out.suffix not in (".png", ".npz"):
        raise UserError(f"--out must end in .png (a grid) or .npz (raw arrays), got {out.name!r}")
    if not 1 <= args.n <= MAX_SAMPLES:
        raise UserError(f"--n must be between 1 and {MAX_SAMPLES} (the per-call cap), got {args.n}")
    parse_model_ref(args.model)  # a malformed NAME@ / path: one line before any connection
    gen, name, version = load_registered_generator(args.model)
    cfg, meta = gen.cfg, gen.meta
    labels = None
    try:
        if cfg.family == "cyclegan":
            if args.label is not None:
                raise UserError(
                    f"--label is for conditional (cgan) generators; {name} is a cyclegan"
                )
            if not args.input:
                raise UserError("a CycleGAN generator translates images: pass --input IMAGE")
            x = _read_image(args.input, cfg.data.image_size, cfg.data.channels)
            y = gen.translate(x, "G" if args.direction == "x2y" else "F")
            images = torch.cat([x, y])  # input and its translation, side by side
            nrow = 2
        else:
            if args.input:
                raise UserError(f"--input is for CycleGAN generators; {name} is a {cfg.family}")
            if cfg.family == "cgan":
                if args.label is not None and args.label not in meta["labels"]:
                    raise UserError(f"--label must be one of {meta['labels']}, got {args.label}")
                labels = (
                    torch.full((args.n,), args.label)
                    if args.label is not None
                    else torch.arange(args.n) % len(meta["labels"])
                )
            elif args.label is not None:
                raise UserError("--label is for conditional (cgan) generators")
            images = gen.generate(args.n, seed=args.seed, labels=labels)
            nrow = 10 if cfg.family == "cgan" and args.label is None else None
    except MlflowException as exc:  # the model's own checks (flows.package.pyfunc)
        raise UserError(exc.message) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        save_grid(images, out, nrow=nrow, scale=4)
    else:
        tmp = out.with_name(out.name + ".tmp.npz")
        arrays = {"images": images.numpy().astype(np.float32)}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
    if not args.json:
        print(f"wrote {tuple(images.shape)} from {name} v{version} to {out}")
    return {
        "name": name,
        "version": version,
        "family": cfg.family,
        "out": str(out),
        "shape": list(images.shape),
    }


def cmd_rollback(args: argparse.Namespace) -> dict:
    from flows.registry.promote import rollback

    result = rollback(args.name)
    if not args.json:
        print(
            f"{result['name']}: champion moved back to v{result['champion']} (v{result['demoted']} demoted)"
        )
    return result


def cmd_serve(args: argparse.Namespace) -> dict:
    import subprocess
    import sys

    from flows.errors import UserError
    from flows.registry.serve import is_loopback, plan

    p = plan(
        args.model,
        host=args.host,
        port=args.port,
        workers=args.workers,
        max_concurrency=args.max_concurrency,
        queue_timeout=args.queue_timeout,
    )
    if not is_loopback(p.host):
        print(
            f"ganflow serve: warning: listening on {p.host}, reachable from other machines; "
            "the scoring server has no authentication",
            file=sys.stderr,
        )
    alias = f" (@{p.alias})" if p.alias else ""
    print(f"serving {p.name} v{p.version}{alias} at {p.url}", file=sys.stderr, flush=True)
    if args.dry_run:
        model = f"models:/{p.name}/{p.version}"
        return {"name": p.name, "version": p.version, "model": model, "url": p.url, "argv": p.argv}
    try:
        rc = subprocess.run(p.argv, env=p.env, check=False).returncode
    except KeyboardInterrupt:
        rc = 0  # Ctrl-C is how a foreground server is stopped
    if rc not in (0, -2, 130):
        raise UserError(f"MLflow's scoring server exited with status {rc} (see its output above)")
    return {"name": p.name, "version": p.version, "url": p.url}


def cmd_models(args: argparse.Namespace) -> dict:
    from flows.registry.models import list_models

    models = list_models()
    if not args.json:
        for m in models:
            aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(m["aliases"].items())) or "-"
            print(f"{m['name']:40} {m['family']:9} {aliases}")
    return {"models": models}


def add_commands(sub, add_common) -> None:
    gen = sub.add_parser(
        "generate",
        help="sample from a registered generator (labels for cGAN, translation for CycleGAN)",
    )
    gen.add_argument(
        "model", metavar="NAME[@alias|/version]", help="registered model; default alias: champion"
    )
    gen.add_argument(
        "--n", type=int, default=64, help="number of samples, at most 1024 (default: 64)"
    )
    gen.add_argument(
        "--label",
        type=int,
        default=None,
        help="cGAN: generate this label only (default: all labels in turn)",
    )
    gen.add_argument(
        "--input", default=None, metavar="IMAGE", help="CycleGAN: the image to translate"
    )
    gen.add_argument(
        "--direction",
        choices=("x2y", "y2x"),
        default="x2y",
        help="CycleGAN: G (x2y, default) or F (y2x)",
    )
    gen.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    gen.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help=".png for a grid, .npz for arrays (images N x C x H x W, labels)",
    )
    add_common(gen)
    gen.set_defaults(func=cmd_generate)

    rb = sub.add_parser(
        "rollback", help="move a model's champion alias back to the previous champion"
    )
    rb.add_argument("name", help="registered model name")
    add_common(rb)
    rb.set_defaults(func=cmd_rollback)

    sv = sub.add_parser(
        "serve",
        help="serve a registered generator with MLflow's scoring server (default: @champion)",
    )
    sv.add_argument(
        "model", metavar="NAME[@alias|/version]", help="registered model; default alias: champion"
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    sv.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    sv.add_argument("--workers", type=int, default=1, help="server processes (default: 1)")
    sv.add_argument(
        "--max-concurrency",
        type=int,
        default=2,
        help="requests one server process generates at once; the others wait (default: 2)",
    )
    sv.add_argument(
        "--queue-timeout",
        type=float,
        default=20.0,
        help="seconds a request waits for a free slot before HTTP 503 (default: 20)",
    )
    sv.add_argument(
        "--dry-run", action="store_true", help="check and print what would be served, then exit"
    )
    add_common(sv)
    sv.set_defaults(func=cmd_serve)

    ls = sub.add_parser("models", help="list registered generators and their aliases")
    add_common(ls)
    ls.set_defaults(func=cmd_models)
