"""The command-line surface: help, --json on the last line, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flows.cli import build_parser, main


def test_surface_is_frozen():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"bench", "run", "local", "generate", "rollback", "tune", "schedule"} <= set(sub.choices)
    run_opts = {o for a in sub.choices["local"]._actions for o in a.option_strings}
    assert {"--families", "--preset", "--set", "--json", "--debug", "--help"} <= run_opts


@pytest.mark.parametrize("argv", [["--help"], ["local", "--help"], ["bench", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: ganflow" in capsys.readouterr().out


def test_invalid_k_is_one_line_error(capsys):
    assert main(["local", "--set", "d_steps=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ganflow local: error: train.d_steps: k must be an integer >= 1, got 0"


def test_invalid_lambda_is_one_line_error(capsys):
    assert main(["local", "--families", "cyclegan", "--set", "lambda_cyc=-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "loss.lambda_cyc" in err and "Traceback" not in err


def test_run_tiny_json_and_artifacts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GANFLOW_HOME", str(tmp_path))
    assert main(["local", "--preset", "tiny", "--quiet", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    fams = [r["family"] for r in result["results"]]
    assert fams == ["gan", "cgan", "cyclegan"]
    for r in result["results"]:
        assert r["primary"] in r["metrics"]
        for name in ("samples.png", "losses.png", "metrics.json", "checkpoint.pt"):
            assert (tmp_path / "runs" / r["out_dir"].split("/runs/")[1] / name).exists()


def test_console_script_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "local", "--families", "nope"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "unknown family" in proc.stderr and "Traceback" not in proc.stderr
