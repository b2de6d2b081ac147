"""The training options are declared once (flows.train.options): `ganflow train`'s flags, the
checks before any work, the request, and the Prefect flow's parameters must all agree with
that declaration. No Ray, no Prefect server."""

from __future__ import annotations

import inspect
import typing

import pytest

from flows.cli import build_parser
from flows.train.options import OPTIONS, TRAIN_OPTIONS, check_options, option_values
from flows.train.spec import ClusterSpec, StorageSpec, TrainError


def _subparser(name: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name]


def _defaults() -> dict[str, object]:
    return option_values({o.name: [] if o.repeated else o.default for o in TRAIN_OPTIONS})


def test_flow_parameters_are_the_declared_options():
    from flows.orchestration.train import train_flow

    params = inspect.signature(train_flow.fn).parameters
    hints = typing.get_type_hints(train_flow.fn)
    assert set(params) == set(OPTIONS)
    for o in TRAIN_OPTIONS:
        p = params[o.name]
        assert p.kind is p.POSITIONAL_OR_KEYWORD, o.name
        expected = p.empty if o.required else o.default
        assert p.default == expected and type(p.default) is type(expected), o.name
        assert hints[o.name] == o.annotation, o.name


def test_train_flags_are_the_declared_options():
    actions = {a.dest: a for a in _subparser("train")._actions}
    for o in TRAIN_OPTIONS:
        a = actions[o.name]
        assert a.option_strings == [o.cli_flag]
        assert a.required == o.required and a.help == o.help_text
        assert a.default == ([] if o.repeated else o.default)
    not_options = {"help", "flow", "json", "debug", "verbose"}
    assert set(actions) - set(OPTIONS) == not_options


def test_help_says_the_default_it_has():
    assert OPTIONS["workers"].help_text == "Ray Train workers (default: 1)"
    assert OPTIONS["gpus_per_worker"].help_text == "GPUs per worker (default: 0, CPU)"
    assert OPTIONS["cpus_per_worker"].help_text == "CPUs reserved per worker (default: 1)"
    assert OPTIONS["max_failures"].help_text == "worker-group restarts allowed (default: 3)"
    assert OPTIONS["config_file"].help_text == "YAML/JSON file of config fields"


def test_tune_shares_the_gpu_flag():
    actions = {a.dest: a for a in _subparser("tune")._actions}
    gpus = OPTIONS["gpus_per_worker"]
    assert actions["gpus_per_worker"].default == gpus.default
    assert actions["gpus_per_worker"].help == gpus.help_text
    assert actions["family"].choices == OPTIONS["family"].choices


@pytest.mark.parametrize(
    ("name", "bad"),
    [("workers", 0), ("gpus_per_worker", -1.0), ("cpus_per_worker", 0.0), ("threads", 0)],
)
def test_cluster_errors_name_the_declared_flag(name, bad):
    # ClusterSpec.check holds the cluster's rules and writes the flags itself.
    with pytest.raises(TrainError) as err:
        check_options({**_defaults(), name: bad})
    assert str(err.value).startswith(f"{OPTIONS[name].cli_flag} must be ")


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("checkpoint_every", 0, "--checkpoint-every must be >= 1, got 0"),
        ("max_failures", -2, "--max-failures must be >= 0 (or -1: no limit), got -2"),
        ("run_name", "a/b", "--run-name 'a/b' must be "),
    ],
)
def test_run_option_errors(name, bad, message):
    with pytest.raises(TrainError) as err:
        check_options({**_defaults(), name: bad})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_defaults_and_edges_pass():
    assert check_options(_defaults()) == ClusterSpec()
    edges = {"checkpoint_every": 1, "max_failures": -1, "run_name": "nightly-1"}
    check_options({**_defaults(), **edges})


def test_cli_and_flow_build_the_same_request():
    from flows.train.options import train_request

    argv = ["train", "--family", "gan", "--workers", "2", "--cpus-per-worker", "0.5"]
    argv += ["--storage", "s3://b/p", "--s3-endpoint-url", "http://h:9000", "--run-name", "r"]
    argv += ["--checkpoint-every", "7", "--max-failures", "-1", "--threads", "2"]
    args = build_parser().parse_args(argv)
    cfg, manifest = object(), object()
    req = train_request(cfg, manifest, option_values(args))
    assert req.cluster == ClusterSpec(workers=2, cpus_per_worker=0.5, threads=2)
    assert req.storage == StorageSpec("s3://b/p", "http://h:9000")
    assert (req.run_name, req.checkpoint_every, req.max_failures) == ("r", 7, -1)
    assert req.cfg is cfg and req.manifest is manifest

    flow_params = {**_defaults(), **{k: getattr(args, k) for k in OPTIONS}}
    assert train_request(cfg, manifest, flow_params) == req


def test_flow_builds_its_request_from_its_parameters(monkeypatch):
    import flows.orchestration.train as flow_module

    seen = {}

    def build_config(family, config_file, overrides, dataset):
        seen["inputs"] = (family, config_file, overrides, dataset)
        return "cfg", "manifest"

    class _Result:
        family = "gan"

    monkeypatch.setattr(flow_module, "build_config_task", build_config)
    monkeypatch.setattr(flow_module, "train_task", lambda req: seen.update(req=req) or _Result())
    monkeypatch.setattr(flow_module, "default_run_name", lambda cfg: "default-name")
    monkeypatch.setattr(flow_module, "train_markdown", lambda *a: "")
    monkeypatch.setattr(flow_module, "create_markdown_artifact", lambda *a, **k: None)
    flow_module.train_flow.fn(
        family="cgan", workers=3, gpus_per_worker=1.0, storage="/s", checkpoint_every=4
    )
    req = seen["req"]
    assert seen["inputs"] == ("cgan", None, [], None)
    assert (req.cfg, req.manifest) == ("cfg", "manifest")
    assert req.cluster == ClusterSpec(workers=3, gpus_per_worker=1.0)
    assert req.storage == StorageSpec("/s", None)
    assert (req.run_name, req.checkpoint_every, req.max_failures) == ("default-name", 4, 3)


def test_flow_refuses_a_bad_parameter_before_any_work(monkeypatch):
    import flows.orchestration.train as flow_module
    from flows.train.spec import TrainError

    def build_config(*args):
        raise AssertionError("the dataset was resolved before the parameters were checked")

    monkeypatch.setattr(flow_module, "build_config_task", build_config)
    with pytest.raises(TrainError, match="--workers") as info:
        flow_module.train_flow.fn(family="gan", workers=0)
    assert "\n" not in str(info.value)
    with pytest.raises(TrainError, match="--max-failures"):
        flow_module.train_flow.fn(family="gan", max_failures=-2)
