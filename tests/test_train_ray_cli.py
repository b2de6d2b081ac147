"""`ganflow train`'s command line: its surface, and the errors that must come before any
cluster work (bad --set, unknown snapshot, unreachable tracking server). No Ray here."""

from __future__ import annotations

import json
import socket

import pytest

from flows.cli import build_parser, main


def _ray_started() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def test_command_line_surface():
    args = build_parser().parse_args(
        [
            "train",
            "--family",
            "cyclegan",
            "--dataset",
            "builtin:digits-unpaired",
            "--workers",
            "2",
            "--gpus-per-worker",
            "1",
            "--set",
            "lambda_cyc=5",
            "--set",
            "d_steps=2",
            "--storage",
            "s3://bucket/ray",
            "--s3-endpoint-url",
            "http://127.0.0.1:9000",
            "--run-name",
            "nightly",
            "--json",
        ]
    )
    assert (args.family, args.workers, args.gpus_per_worker) == ("cyclegan", 2, 1.0)
    assert args.overrides == ["lambda_cyc=5", "d_steps=2"]
    assert (args.storage, args.s3_endpoint_url, args.run_name) == (
        "s3://bucket/ray",
        "http://127.0.0.1:9000",
        "nightly",
    )
    assert args.json and args.func.__name__ == "cmd_train"


def test_config_file_then_overrides(tmp_path):
    from flows.ingest.resolve import ensure_snapshot
    from flows.orchestration.inputs import config_and_snapshot
    from flows.train.config import build_config, user_overrides

    f = tmp_path / "c.yaml"
    f.write_text("train:\n  d_steps: 2\n  steps: 50\nloss.lambda_cyc: 3\n")
    cfg, manifest = config_and_snapshot("cyclegan", str(f), ["d_steps=4"])
    assert (cfg.train.d_steps, cfg.train.steps, cfg.loss.lambda_cyc) == (4, 50, 3.0)
    # The config follows the snapshot: the built-in pair is 16 px, one channel.
    assert (cfg.data.image_size, cfg.data.channels) == (16, 1)
    assert cfg.data.dataset == manifest.id and manifest.kind == "unpaired"
    _, precision_set = build_config("cyclegan", user_overrides(str(f), []), manifest)
    assert not precision_set
    digits = ensure_snapshot("builtin:digits")
    _, precision_set = build_config("gan", user_overrides(None, ["train.precision=fp32"]), digits)
    assert precision_set


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "d_steps=0"], "train.d_steps: k must be an integer >= 1"),
        (["--set", "nope=1"], "nope: unknown config field"),
        (["--dataset", "no-such-snapshot"], "no snapshot 'no-such-snapshot'"),
    ],
)
def test_errors_are_one_line_before_any_cluster_work(argv, message, capsys):
    rc = main(["train", "--family", "gan", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and "\n" not in err, err
    assert not _ray_started()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "--config file not found: {}"),
        ("train: [unclosed\n", "--config file {} is not valid YAML"),
        ("- a list\n", "--config file {} must be a mapping"),
        (b"\xff\xfe\x00binary", "--config file {} is not valid YAML"),
    ],
    ids=["missing", "not-yaml", "not-a-mapping", "binary"],
)
def test_bad_config_file_is_one_line(tmp_path, content, message, capsys):
    f = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    rc = main(["train", "--family", "gan", "--config", str(f)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message.format(f) in err and "\n" not in err, err
    assert not _ray_started()


def test_unreachable_tracking_server_fails_before_training(monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    rc = main(["train", "--family", "gan", "--dataset", "builtin:digits", "--json"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "unreachable" in err and "\n" not in err, err
    assert not _ray_started()


def test_json_result_shape(monkeypatch, capsys):
    """--json prints run_id and metrics (the trainer itself is stubbed: no cluster here)."""
    import flows.cli.train as tr
    from flows.train.spec import TrainResult

    def fake(req):
        return TrainResult("r1", "n", "gan", req.manifest.id, 3, {"fd": 1.5}, "c", "s")

    monkeypatch.setattr(tr, "run_training", fake)
    assert main(["train", "--family", "gan", "--set", "steps=3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["run_id"] == "r1" and out["metrics"]["fd"] == 1.5
    keys = ["run_id", "run_name", "family", "snapshot_id", "steps", "metrics", "checkpoint"]
    assert list(out) == [*keys, "storage"]
