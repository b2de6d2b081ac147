"""`ganflow generate` and `ganflow rollback`: use and manage registered generators."""

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
    from flows.errors import UserError
    from flows.registry.models import load_registered
    from gan_core.evaluate import sample
    from gan_core.viz import save_grid

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise UserError(f"--out must end in .png (a grid) or .npz (raw arrays), got {out.name!r}")
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    cfg, nets, meta = load_registered(args.model)
    labels = None
    if cfg.family == "cyclegan":
        if not args.input:
            raise UserError("a CycleGAN generator translates images: pass --input IMAGE")
        net = nets["G"] if args.direction == "x2y" else nets["F"]
        x = _read_image(args.input, cfg.data.image_size, cfg.data.channels)
        with torch.no_grad():
            images = torch.cat([x, net(x)])  # input and its translation, side by side
        nrow = 2
    else:
        if args.input:
            raise UserError(f"--input is for CycleGAN generators; {meta['name']} is a {cfg.family}")
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
        images = sample(cfg, nets["G"], args.n, seed=args.seed, labels=labels)
        nrow = 10 if cfg.family == "cgan" and args.label is None else None
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
        print(f"wrote {tuple(images.shape)} from {meta['name']} v{meta['version']} to {out}")
    return {
        "name": meta["name"],
        "version": meta["version"],
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


def add_commands(sub, add_common) -> None:
    gen = sub.add_parser(
        "generate",
        help="sample from a registered generator (labels for cGAN, translation for CycleGAN)",
    )
    gen.add_argument(
        "model", metavar="NAME[@alias|/version]", help="registered model; default alias: champion"
    )
    gen.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
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
