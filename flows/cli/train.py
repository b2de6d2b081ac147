"""`ganflow train`: the command line of a training job (flows.train)."""

from __future__ import annotations

import argparse

from flows.orchestration.inputs import config_and_snapshot
from flows.settings import check_name
from flows.train.driver import run_training
from flows.train.spec import ClusterSpec, StorageSpec, TrainError, TrainRequest
from gan_core.config import FAMILIES


def _check_args(args: argparse.Namespace) -> ClusterSpec:
    """The numbers and the run name, before the dataset is resolved (an ingest) or Ray
    starts: each a one-line TrainError."""
    cluster = ClusterSpec(
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        threads=args.threads,
    ).check()
    if args.run_name is not None:
        check_name(args.run_name, "--run-name", TrainError)
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise TrainError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.max_failures < -1:
        raise TrainError(f"--max-failures must be >= 0 (or -1: no limit), got {args.max_failures}")
    return cluster


def cmd_train(args: argparse.Namespace) -> dict:
    cluster = _check_args(args)
    if args.flow:
        from flows.orchestration.train import train_flow

        result = train_flow(
            family=args.family,
            dataset=args.dataset,
            overrides=args.overrides,
            config_file=args.config,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker,
            threads=args.threads,
            storage=args.storage,
            s3_endpoint_url=args.s3_endpoint_url,
            run_name=args.run_name,
            checkpoint_every=args.checkpoint_every,
            max_failures=args.max_failures,
        )
    else:
        cfg, manifest = config_and_snapshot(args.family, args.config, args.overrides, args.dataset)
        req = TrainRequest(
            cfg=cfg,
            manifest=manifest,
            cluster=cluster,
            storage=StorageSpec(args.storage, args.s3_endpoint_url),
            run_name=args.run_name,
            checkpoint_every=args.checkpoint_every,
            max_failures=args.max_failures,
        )
        result = run_training(req)
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
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument(
        "--dataset",
        metavar="SNAPSHOT",
        help="snapshot id or name, or builtin:digits / builtin:digits-unpaired "
        "(default: the family's built-in)",
    )
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: 1)")
    p.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default: 0, CPU)"
    )
    p.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default: 1)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads per worker (default: 1)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. d_steps=3 or lambda_cyc=10 (repeatable); "
        "train.batch_size is per worker",
    )
    p.add_argument("--config", metavar="FILE", help="YAML/JSON file of config fields")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="checkpoint storage: a folder or s3://bucket/prefix "
        "(default: GANFLOW_RAY_STORAGE, else GANFLOW_HOME/ray_results)",
    )
    p.add_argument(
        "--s3-endpoint-url",
        metavar="URL",
        help="S3-compatible endpoint for s3:// storage (default: GANFLOW_S3_ENDPOINT_URL, "
        "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL)",
    )
    p.add_argument(
        "--run-name", help="Ray run name; rerunning an existing name resumes it (default: new)"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help="iterations between checkpoints (default: 5 x log_every; always at the end)",
    )
    p.add_argument(
        "--max-failures", type=int, default=3, help="worker-group restarts allowed (default: 3)"
    )
    p.add_argument("--flow", action="store_true", help="run inside the Prefect flow")
    add_common(p)
    p.set_defaults(func=cmd_train)
