"""`ganflow train`: the command line of a training job (flows.train)."""

from __future__ import annotations

import argparse

from flows.orchestration.inputs import config_and_snapshot
from flows.train.driver import run_training
from flows.train.options import add_arguments, check_options, option_values, train_request


def cmd_train(args: argparse.Namespace) -> dict:
    values = option_values(args)
    check_options(values)
    if args.flow:
        from flows.orchestration.train import train_flow

        result = train_flow(**values)
    else:
        cfg, manifest = config_and_snapshot(
            values["family"], values["config_file"], values["overrides"], values["dataset"]
        )
        result = run_training(train_request(cfg, manifest, values))
    if not args.json:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items())
        print(f"run {result.run_name} (MLflow run {result.run_id}): {shown}")
        print(f"checkpoint: {result.checkpoint}")
    return result.to_dict()


def add_commands(sub, add_common) -> None:
    p = sub.add_parser(
        "train",
        help="train a GAN family as a Ray Train job (local or RAY_ADDRESS), tracked in MLflow",
    )
    add_arguments(p)
    p.add_argument("--flow", action="store_true", help="run inside the Prefect flow")
    add_common(p)
    p.set_defaults(func=cmd_train)
