"""Bad input, answered as a user should see it: a non-zero exit, exactly one line on stderr
that names the problem, nothing written outside GANFLOW_HOME and nothing half-written inside
it (no `.tmp-` files, no snapshot folder without its manifest, no MLflow run left RUNNING).

Every case runs through the real command line (``flows.cli.main``) in this process; a
failing case's report names its command line. Cases by command:

- ganflow: no command; an unknown command.
- local: unknown family; k = 0.
- bench: a non-integer --iters.
- train: --run-name with ``..`` or ``/`` (it names a folder under the Ray storage root);
  --workers 0 / x; --cpus-per-worker 0; --gpus-per-worker -1; --threads 0;
  --checkpoint-every 0; --max-failures -2; no --family. With a 2-CPU Ray cluster (one,
  shared): --workers 3, --workers 1000, --cpus-per-worker 3 fail before any MLflow run;
  --storage on a full disk (a 256 KiB tmpfs) ends the run at its checkpoint.
- tune: --workers-per-trial 0; --samples 0; --max-concurrent 0; --name with ``..``;
  --resume without --name; --resume of a search that never existed; --space with a float
  distribution over an integer field (uniform, loguniform) and randint with float bounds.
- ingest: --workers -1; --name with ``..``; a missing source; a source that is a link loop;
  a folder holding only a link loop; --image-size 1024; --test-fraction 1.5.
- run: a dataset folder that is missing; a snapshot name that is not there; ``search:
  maybe``; ``margin: "0.5"``; an unknown family; an unknown key.
- schedule: a bad --cron (before "serving..." is printed).
- generate: an unknown model; ``NAME@``; --n 0 and over the per-call cap; --out a folder;
  a non-integer --label. rollback: ``NAME/1``. serve: an unknown model. models: an unknown
  flag. (With registered models: tests/test_serving.py.)
- more ingest: an unknown built-in; --channels 2; --resize squash; --val-fraction 0.9;
  --max-bad-fraction 2; --layout weird.
- more train: a missing or invalid --config file; an unknown field; ``--set d_steps``;
  λ < 0; an unknown snapshot; an override contradicting the snapshot; a family the data
  cannot serve; eval.inception without FID weights. More tune: a missing --space file;
  k = 0. local: an unknown preset. run: a missing config file.

Beyond the table: a job that fails or is interrupted ends its MLflow run FAILED or KILLED;
ingest follows links to folders, quarantines loops with a reason, scales 16-bit PNGs, and an
interrupted ingest leaves nothing (a killed one's leftovers go with the next ingest).
"""

from __future__ import annotations

import io
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main

pytestmark = pytest.mark.timeout(600)

HOME = "ganflow-home"  # conftest's GANFLOW_HOME under tmp_path


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _images(folder: Path, n: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        _write_png(folder / f"{i}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    return folder


# --- setups: each gets the test's folder for inputs and returns values for {placeholders} --


def _loop_source(d: Path) -> dict:
    os.symlink(d / "loop-b", d / "loop-a")
    os.symlink(d / "loop-a", d / "loop-b")
    return {"src": str(d / "loop-a")}


def _folder_of_loops(d: Path) -> dict:
    (d / "only-loops").mkdir()
    os.symlink("self", d / "only-loops" / "self")
    return {"src": str(d / "only-loops")}


def _yaml(text: str):
    def setup(d: Path) -> dict:
        (d / "pipeline.yaml").write_text(text.format(d=d))
        return {"cfg": str(d / "pipeline.yaml")}

    return setup


def _space(text: str):
    def setup(d: Path) -> dict:
        (d / "space.yaml").write_text(text)
        return {"space": str(d / "space.yaml")}

    return setup


# (command line, phrase the one stderr line must hold, setup or None). Exit code 2 for all.
CASES = [
    ([], "required: COMMAND", None),
    (["nope"], "invalid choice: 'nope'", None),
    (["local", "--families", "nope"], "unknown family", None),
    (["local", "--set", "d_steps=0"], "train.d_steps: k must be an integer >= 1", None),
    (["bench", "--iters", "x"], "invalid int value: 'x'", None),
    (["train"], "required: --family", None),
    (["train", "--family", "gan", "--run-name", "../../evil"], "--run-name '../../evil'", None),
    (["train", "--family", "gan", "--run-name", "a/b"], "--run-name 'a/b' must be", None),
    (["train", "--family", "gan", "--workers", "0"], "--workers must be an integer >= 1", None),
    (["train", "--family", "gan", "--workers", "x"], "invalid int value: 'x'", None),
    (["train", "--family", "gan", "--cpus-per-worker", "0"], "--cpus-per-worker must be", None),
    (["train", "--family", "gan", "--gpus-per-worker", "-1"], "--gpus-per-worker must be", None),
    (["train", "--family", "gan", "--threads", "0"], "--threads must be an integer >= 1", None),
    (["train", "--family", "gan", "--checkpoint-every", "0"], "--checkpoint-every must", None),
    (["train", "--family", "gan", "--max-failures", "-2"], "--max-failures must be", None),
    (["tune", "--family", "gan", "--workers-per-trial", "0"], "--workers-per-trial must", None),
    (["tune", "--family", "gan", "--samples", "0"], "--samples must be >= 1", None),
    (["tune", "--family", "gan", "--max-concurrent", "0"], "--max-concurrent must be", None),
    (["tune", "--family", "gan", "--name", "../evil"], "--name '../evil' must be", None),
    (["tune", "--family", "gan", "--resume"], "--resume needs the --name", None),
    (
        ["tune", "--family", "gan", "--resume", "--name", "never-existed"],
        "nothing to resume: no search named 'never-existed'",
        None,
    ),
    (
        ["tune", "--family", "gan", "--space", "{space}"],
        "train.d_steps is an integer field; uniform draws floats",
        _space("train.d_steps: {uniform: [1, 5]}\n"),
    ),
    (
        ["tune", "--family", "gan", "--space", "{space}"],
        "train.d_steps is an integer field; loguniform draws floats",
        _space("d_steps: {loguniform: [1, 5]}\n"),
    ),
    (
        ["tune", "--family", "gan", "--space", "{space}"],
        "randint needs integer [low, high]",
        _space("d_steps: {randint: [1.5, 5]}\n"),
    ),
    (["ingest", "builtin:digits", "--workers", "-1"], "--workers must be >= 0", None),
    (["ingest", "builtin:digits", "--name", "../evil"], "snapshot name '../evil' must", None),
    (["ingest", "{d}/missing"], "source not found", None),
    (["ingest", "{src}"], "is a dangling link or a link loop", _loop_source),
    (["ingest", "{src}"], "a link loop; not followed", _folder_of_loops),
    (["ingest", "builtin:digits", "--image-size", "1024"], "8..512", None),
    (["ingest", "builtin:digits", "--test-fraction", "1.5"], "test_fraction", None),
    (
        ["run", "--config", "{cfg}"],
        "datasets.gan: source not found",
        _yaml("families: [gan]\ndatasets:\n  gan: {d}/no-such-folder\n"),
    ),
    (
        ["run", "--config", "{cfg}"],
        "datasets.gan: no snapshot 'no-such-snapshot'",
        _yaml("families: [gan]\ndatasets:\n  gan: no-such-snapshot\n"),
    ),
    (
        ["run", "--config", "{cfg}"],
        "search: must be one of false, true, asha, pbt, pb2",
        _yaml("search: maybe\n"),
    ),
    (["run", "--config", "{cfg}"], "margin: must be a number", _yaml('margin: "0.5"\n')),
    (["run", "--config", "{cfg}"], "families: unknown", _yaml("families: [gam]\n")),
    (["run", "--config", "{cfg}"], "unknown keys ['epochs']", _yaml("epochs: 3\n")),
    (["schedule", "--cron", "bad cron"], '--cron: Invalid cron string: "bad cron"', None),
    # The registry's commands against an empty registry (with models: tests/test_serving.py).
    (["generate", "no-such-model", "--out", "{d}/x.png"], "no registered model named", None),
    (["generate", "name@", "--out", "{d}/x.png"], "nothing after '@'", None),
    (["generate", "m", "--n", "0", "--out", "{d}/x.png"], "--n must be between 1 and", None),
    (["generate", "m", "--n", "100000000", "--out", "{d}/x.png"], "(the per-call cap)", None),
    (["generate", "m", "--out", "{d}"], "is a directory", None),
    (["generate", "m", "--label", "x", "--out", "{d}/x.png"], "invalid int value: 'x'", None),
    (["rollback", "m/1"], "names a version or alias; this takes the model name", None),
    (["serve", "no-such-model"], "no registered model named", None),
    (["models", "--bogus"], "unrecognized arguments: --bogus", None),
    (["ingest", "builtin:nope"], "unknown built-in dataset 'builtin:nope'", None),
    (["ingest", "builtin:digits", "--channels", "2"], "invalid choice: 2", None),
    (["ingest", "builtin:digits", "--resize", "squash"], "invalid choice: 'squash'", None),
    (["ingest", "builtin:digits", "--val-fraction", "0.9"], "test_fraction + val_fraction", None),
    (["ingest", "builtin:digits", "--max-bad-fraction", "2"], "max_bad_fraction: must be", None),
    (["ingest", "builtin:digits", "--layout", "weird"], "invalid choice: 'weird'", None),
    (["train", "--family", "gan", "--config", "{d}/missing.yaml"], "file not found", None),
    (
        ["train", "--family", "gan", "--config", "{cfg}"],
        "is not valid YAML",
        _yaml("train: [unclosed\n"),
    ),
    (["train", "--family", "gan", "--set", "nope=1"], "nope: unknown config field", None),
    (["train", "--family", "gan", "--set", "d_steps"], "must look like key=value", None),
    (["train", "--family", "gan", "--set", "lambda_cyc=-1"], "loss.lambda_cyc: must be", None),
    (["train", "--family", "gan", "--dataset", "no-such-snapshot"], "no snapshot", None),
    # The config follows the data: a contradiction or a family the data cannot serve.
    (
        ["train", "--family", "cgan", "--set", "data.channels=3"],
        "data.channels: 3 contradicts",
        None,
    ),
    (["train", "--family", "cyclegan", "--dataset", "builtin:digits"], "cannot train on", None),
    (["train", "--family", "gan", "--set", "eval.inception=true"], "GANFLOW_FID_WEIGHTS", None),
    (["tune", "--family", "gan", "--space", "{d}/missing.yaml"], "file not found", None),
    (["tune", "--family", "gan", "--set", "d_steps=0"], "train.d_steps: k must be", None),
    (["local", "--preset", "nope"], "unknown preset 'nope'", None),
    (["run", "--config", "{d}/missing.yaml"], "config file not found", None),
]

# Cases that reach a (shared, 2-CPU) Ray cluster: refused when the cluster is asked.
RAY_CASES = [
    (
        ["train", "--family", "gan", "--workers", "3"],
        "the job needs 3 CPUs (3 workers x 1), the Ray cluster has 2 "
        "(set GANFLOW_RAY_MAX_CPUS if it autoscales)",
    ),
    (["train", "--family", "gan", "--workers", "1000"], "the job needs 1000 CPUs"),
    (
        ["train", "--family", "gan", "--cpus-per-worker", "3"],
        "the job needs 3 CPUs (1 workers x 3), the Ray cluster has 2",
    ),
    (["tune", "--family", "gan", "--workers-per-trial", "3"], "the job needs 2.7 CPUs"),
]


def _files(root: Path, skip: Path) -> set[str]:
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if skip not in p.parents and p != skip and not p.is_dir()
    }


def _running_runs(home: Path) -> list[str]:
    db = home / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("select name from runs where status = 'RUNNING'")]


def _half_written(home: Path) -> list[str]:
    bad = [str(p) for p in home.rglob("*.tmp-*")]
    snaps = home / "snapshots"
    if snaps.is_dir():
        bad += [
            str(p)
            for p in snaps.iterdir()
            if len(p.name) == 20 and p.is_dir() and not (p / "manifest.json").exists()
        ]
    return bad


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    # The console's pointer to the library log is not an error line.
    err = [ln for ln in err if not ln.startswith("[ganflow] library logs:")]
    return rc, err


def _check(argv, phrase, tmp_path, capsys, before: set[str]) -> None:
    shown = "ganflow " + " ".join(argv)
    home = tmp_path / HOME
    rc, err = _run(argv, capsys)
    assert rc == 2, f"{shown}: exit {rc}, stderr {err}"
    assert len(err) == 1, f"{shown}: {len(err)} stderr lines: {err}"
    assert phrase in err[0], f"{shown}: {err[0]!r} lacks {phrase!r}"
    assert "Traceback" not in err[0], shown
    after = _files(tmp_path, home)
    assert after == before, f"{shown}: wrote outside GANFLOW_HOME: {sorted(after - before)}"
    assert not _half_written(home), f"{shown}: half-written: {_half_written(home)}"
    assert not _running_runs(home), f"{shown}: MLflow runs left RUNNING"


@pytest.mark.parametrize(
    "argv, phrase, setup", CASES, ids=[" ".join(c[0]) or "(none)" for c in CASES]
)
def test_bad_input_is_one_line(argv, phrase, setup, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a relative path that escaped would land here
    values = {"d": str(inputs), **(setup(inputs) if setup else {})}
    argv = [a.format(**values) for a in argv]
    _check(argv, phrase, tmp_path, capsys, _files(tmp_path, tmp_path / HOME))


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    from ray_isolated import isolated_cluster, use_test_env

    with pytest.MonkeyPatch.context() as mp:
        use_test_env(mp)
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.delenv("GANFLOW_RAY_MAX_CPUS", raising=False)
        mp.delenv("GANFLOW_RAY_MAX_GPUS", raising=False)
        with isolated_cluster([2]) as cluster:
            yield cluster


@pytest.mark.parametrize("argv, phrase", RAY_CASES, ids=[" ".join(c[0]) for c in RAY_CASES])
@pytest.mark.slow
def test_resources_checked_against_the_cluster(
    argv, phrase, ray_cluster, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path, tmp_path / HOME)
    _check([*argv, "--set", "train.steps=2"], phrase, tmp_path, capsys, before)


@pytest.mark.slow
def test_autoscaling_ceiling_is_named(ray_cluster, monkeypatch):
    """An autoscaling cluster (GANFLOW_RAY_MAX_CPUS) may wait for CPUs up to its ceiling."""
    from flows.train.driver import check_resources
    from flows.train.spec import ClusterSpec, TrainError

    monkeypatch.setenv("GANFLOW_RAY_MAX_CPUS", "8")
    check_resources(ClusterSpec(workers=4))  # waits for the autoscaler: no error
    with pytest.raises(TrainError, match="can grow to 8 \\(GANFLOW_RAY_MAX_CPUS\\)"):
        check_resources(ClusterSpec(workers=9))
    monkeypatch.setenv("GANFLOW_RAY_MAX_CPUS", "lots")
    with pytest.raises(TrainError, match="GANFLOW_RAY_MAX_CPUS must be a number"):
        check_resources(ClusterSpec(workers=9))


@pytest.mark.slow  # a Ray Train run of 10 iterations on the module's cluster
def test_full_disk_ends_ganflow_train_in_one_line(
    ray_cluster, small_disk, tmp_path, monkeypatch, capsys, classifier_cache
):
    """`ganflow train` with its Ray storage on a full disk (the gan preset's checkpoint, a few
    MiB, outgrows the 256 KiB tmpfs): exit 2, one line naming the folder and the space
    needed, nothing of the checkpoint left (the checkpoint writes themselves: test_faults.py).
    In this process on the module's cluster: a CLI process would start a Ray of its own."""
    from home_cache import seed_judges

    for k in [k for k in os.environ if k.startswith(("GANFLOW_", "MLFLOW_"))]:
        if k != "GANFLOW_HOME":
            monkeypatch.delenv(k)
    seed_judges(tmp_path / HOME, classifier_cache)  # the end's evaluation comes first
    storage = small_disk / "ray"
    argv = ["train", "--family", "gan", "--set", "train.steps=10", "--storage", str(storage)]
    rc, err = _run(argv, capsys)
    lines = [ln for ln in err if not ln.startswith("[ganflow]")]
    assert rc == 2 and len(lines) == 1, err
    assert "CheckpointError: disk full: a checkpoint needs " in lines[0]
    assert f"MiB in {storage}/" in lines[0] and "MiB is free there" in lines[0]
    # No checkpoint file, whole or cut short (a `.tmp`): Ray's own dot-named storage marker
    # is all that is left.
    left = [p for p in small_disk.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert not left, left


# --- homes and stores that cannot be written: one line before any work ---------------------

# (command line, variable, its value, phrase). {file} is a regular file, so a path under it
# cannot be created even by root (ENOTDIR), whom permission bits do not stop; the real
# permission case, as an unprivileged user, is test_unwritable_as_another_user below.
STORE_CASES = [
    # A file that is not a database (damaged, or another kind): MLflow's own traceback before.
    (
        ["models"],
        "MLFLOW_TRACKING_URI",
        "sqlite:///{file}",
        "MLflow tracking store {file} is not an SQLite database (damaged, or another kind of "
        "file); set MLFLOW_TRACKING_URI",
    ),
    (["train", "--family", "gan"], "MLFLOW_TRACKING_URI", "sqlite:///{file}", "is not an SQLite"),
    (
        ["ingest", "builtin:digits"],
        "GANFLOW_HOME",
        "{file}/home",
        "GANFLOW_HOME {file}/home cannot be written: {file} is a file, not a folder",
    ),
    (["ingest", "builtin:digits"], "GANFLOW_HOME", "{file}", "{file} cannot be written: it is"),
    (
        ["ingest", "builtin:digits"],
        "GANFLOW_STORAGE_ROOT",
        "{file}/snaps",
        "snapshot root {file}/snaps cannot be written: {file} is a file, not a folder; "
        "set GANFLOW_STORAGE_ROOT",
    ),
    (["ingest", "builtin:digits", "--root", "{file}/s"], None, None, "{file}/s cannot be written"),
    (
        ["train", "--family", "gan"],
        "GANFLOW_RAY_STORAGE",
        "{file}/ray",
        "Ray storage {file}/ray cannot be written",
    ),
    (["train", "--family", "gan", "--storage", "{file}/r"], None, None, "; set --storage"),
    (["tune", "--family", "gan"], "GANFLOW_STORAGE_ROOT", "{file}/s", "snapshot root {file}/s"),
    (
        ["models"],
        "MLFLOW_TRACKING_URI",
        "sqlite:///{file}/m.db",
        "MLflow tracking store {file}/m.db cannot be written",
    ),
    (
        ["generate", "m", "--out", "{d}/x.png"],
        "MLFLOW_TRACKING_URI",
        "sqlite:///{d}",  # a folder where the database file should be
        "is a folder, not a database file; set MLFLOW_TRACKING_URI",
    ),
    (["run"], "MLFLOW_TRACKING_URI", "file://{file}/mlruns", "store {file}/mlruns cannot be"),
]


@pytest.mark.parametrize(
    "argv, var, value, phrase",
    STORE_CASES,
    ids=[f"{c[0][0]} {c[1] or c[0][-2]}" for c in STORE_CASES],
)
def test_unwritable_store_is_one_line(argv, var, value, phrase, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "file").write_text("a file, not a folder")
    values = {"d": str(inputs / "d.db"), "file": str(inputs / "file")}
    (inputs / "d.db").mkdir()
    monkeypatch.chdir(inputs)
    if var:
        monkeypatch.setenv(var, value.format(**values))
    before = _files(tmp_path, tmp_path / HOME)
    _check([a.format(**values) for a in argv], phrase.format(**values), tmp_path, capsys, before)
    # Before any work: not even GANFLOW_HOME's log folder was made.
    assert not (tmp_path / HOME).exists()


# What an earlier test in the same process may have exported (a session's tracking server,
# Ray or Prefect address) must not decide which store these commands check.
_SERVICES = ("GANFLOW_", "MLFLOW_", "RAY_ADDRESS", "PREFECT_API_URL")


def _as_nobody(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        + [sys.executable, "-m", "flows.cli", *argv],
        env={k: v for k, v in os.environ.items() if not k.startswith(_SERVICES)} | env,
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # four CLI processes: 52 s on this loaded 2-core machine
@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to become nobody"
)
def test_unwritable_as_another_user():
    """Real permissions: the commands run as nobody against folders and files root owns (a
    home that is another user's, a read-only database); one line each, nothing written."""
    base = Path(tempfile.mkdtemp(prefix="ganflow-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)  # nobody may look in, not write
        theirs = base / "root-owned"
        theirs.mkdir()
        mine = base / "nobody-home"
        mine.mkdir()
        os.chown(mine, pwd.getpwnam("nobody").pw_uid, -1)
        (mine / "mlflow.db").write_bytes(b"")  # root's, mode 644: readable, not writable
        cases = [
            (
                ["ingest", "builtin:digits"],
                {"GANFLOW_HOME": str(theirs)},
                f"GANFLOW_HOME {theirs} cannot be written (permission denied)",
            ),
            (
                ["ingest", "builtin:digits"],
                {"GANFLOW_HOME": str(theirs / "new" / "home")},
                f"(permission denied to create a file in {theirs})",
            ),
            (
                ["train", "--family", "gan"],
                {"GANFLOW_HOME": str(mine), "GANFLOW_RAY_STORAGE": str(theirs / "ray")},
                f"Ray storage {theirs / 'ray'} cannot be written",
            ),
            (
                ["models"],
                {"GANFLOW_HOME": str(mine)},
                f"MLflow tracking store {mine / 'mlflow.db'} cannot be written (permission denied)",
            ),
        ]
        procs = [(argv, _as_nobody(argv, env), phrase) for argv, env, phrase in cases]
        for argv, proc, phrase in procs:
            out, err = proc.communicate(timeout=300)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert proc.returncode == 2, (argv, err)
            assert len(lines) == 1 and phrase in lines[0], (argv, lines)
        left = sorted(str(p) for p in base.rglob("*"))
        assert left == sorted(map(str, [theirs, mine, mine / "mlflow.db"])), left
        assert (mine / "mlflow.db").read_bytes() == b""
    finally:
        shutil.rmtree(base)


def test_ray_that_cannot_start_is_one_line(tmp_path):
    """A local Ray that fails to start (here its temp dir is under a file; on a loaded machine,
    Ray's own start-up timeout) ends `ganflow train` in one line naming Ray, with no MLflow run
    left RUNNING and no Ray process left behind."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    home = tmp_path / HOME
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SERVICES)}
    env |= {"GANFLOW_HOME": str(home), "RAY_TMPDIR": str(blocker / "ray")}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "train", "--family", "gan", "--set", "steps=2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("[ganflow] library logs:")]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, lines
    assert "Ray: the local instance did not start" in lines[0], lines[0]
    assert "Not a directory" in lines[0] and "RAY_TMPDIR" in lines[0], lines[0]
    assert not _running_runs(home)
    ours = subprocess.run(["pgrep", "-f", str(blocker)], capture_output=True, text=True)
    assert not ours.stdout.strip(), f"Ray processes left: {ours.stdout}"


# --- a job that fails or is interrupted ends its MLflow run ----------------------------------


@pytest.mark.parametrize(
    "raised, rc, status", [(KeyboardInterrupt(), 130, "KILLED"), (ValueError("boom"), 2, "FAILED")]
)
def test_mlflow_run_never_left_running(raised, rc, status, tmp_path, monkeypatch, capsys):
    import flows.train.driver as driver

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # No cluster here: the failure comes from inside the fit, after the run was created.
    monkeypatch.setattr(driver, "ensure_ray", lambda **kw: None)
    monkeypatch.setattr(driver, "check_resources", lambda cluster: None)

    def fit(*args, **kwargs):
        raise raised

    monkeypatch.setattr(driver, "_fit", fit)
    got, err = _run(["train", "--family", "gan", "--run-name", "r1", "--set", "steps=2"], capsys)
    assert got == rc and len(err) == 1, err
    with sqlite3.connect(tmp_path / HOME / "mlflow.db") as con:
        assert [r[0] for r in con.execute("select status from runs")] == [status]


# --- ingest that the filesystem cannot fool ------------------------------------------------


def test_links_to_folders_followed_and_loops_quarantined(tmp_path, capsys):
    import json

    src = tmp_path / "src"
    _images(src / "a", 10, seed=1)
    _images(tmp_path / "elsewhere", 10, seed=2)
    os.symlink(tmp_path / "elsewhere", src / "b")  # a class folder that is a link: followed
    os.symlink(src, src / "a" / "up")  # a link to a folder that contains it: a loop
    os.symlink("gone", src / "a" / "dangling")
    rc = main(
        ["ingest", str(src), "--no-prefect", "--quiet", "--json", "--max-bad-fraction", "0.2"]
    )
    assert rc == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["counts"] == {"a": 10, "b": 10}
    reasons = {q["path"]: q["reason"] for q in out["quarantined"]}
    assert reasons == {
        "a/up": "a link to a folder that contains it (a loop)",
        "a/dangling": "a dangling link; not followed",
    }


def test_16_bit_png_scaled_not_clipped():
    from flows.ingest.layouts import decode_image

    ramp = (np.arange(32 * 32, dtype=np.uint32) * 64).astype(np.uint16).reshape(32, 32)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    d = decode_image(buf.getvalue())
    got = d.images[0][:, :, 0]
    assert d.gray and got.dtype == np.uint8
    want = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(got, want)
    assert len(np.unique(got)) == 256  # a ramp, not black and white
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.float32)).save(buf, format="TIFF")
    with pytest.raises(ValueError, match="floating-point pixels of unknown range"):
        decode_image(buf.getvalue())


def test_interrupted_ingest_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C while shards are written: no shard without a manifest, no `.tmp-`; a killed
    ingest's leftovers (an hour old) go with the next successful ingest."""
    import flows.snapshots.store as store

    src = _images(tmp_path / "flat", 20)
    root = tmp_path / HOME / "snapshots"
    real_put = store._put_bytes
    calls = {"n": 0}

    class CutShort:
        """The local filesystem, with Ctrl-C arriving halfway through writing a file."""

        def __init__(self, fs):
            self.fs, self.protocol = fs, fs.protocol

        def pipe_file(self, path, data):
            Path(path).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt

    def put(fs, path, data):
        calls["n"] += 1  # the first shard is written, the second is cut short
        return real_put(CutShort(fs) if calls["n"] == 2 else fs, path, data)

    monkeypatch.setattr(store, "SHARD_BYTES", 2000)  # several shards per split
    monkeypatch.setattr(store, "_put_bytes", put)
    from flows.ingest import ingest

    with pytest.raises(KeyboardInterrupt):
        ingest(str(src))
    assert not [p for p in root.rglob("*") if p.is_file()], list(root.rglob("*"))
    assert not list((tmp_path / HOME / "tmp").glob("ingest-*"))

    # What a SIGKILL would leave: a manifest-less folder and a temporary file, an hour old.
    left = root / ("0" * 20)
    left.mkdir(parents=True)
    (left / "train-00000.npz").write_bytes(b"x")
    stray = root / "refs" / "sources" / "abc.json.tmp-1"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"x")
    old = store.time.time() - 2 * store.STALE_S
    for p in (left / "train-00000.npz", left, stray):
        os.utime(p, (old, old))
    monkeypatch.setattr(store, "_put_bytes", real_put)
    ingest(str(src))
    assert not left.exists() and not stray.exists()
    assert not _half_written(tmp_path / HOME)
