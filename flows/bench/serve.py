"""Serving under load: `python -m flows.bench.serve [--clients 1,4,16] [--requests 6]`.

What a user's `ganflow serve` does with several clients at once, measured on loopback:

1. a conv cGAN (32 px RGB, 3 labels, the preset a user's folder of small RGB images gets)
   and a CycleGAN (its 32 px preset) are built and trained for a few steps (the figures
   measure serving, not quality), logged and registered as the pipeline does, each
   aliased ``champion``, in a SQLite MLflow in a temporary folder;
2. for each family, ``ganflow serve``'s own plan (`flows.registry.serve.plan`: MLflow's
   scoring server with ganflow's request limit) is started and waited on (``/ping``);
3. for each answer format (JSON arrays, PNG) and client count, every client sends
   ``--requests`` requests one after another (each asking for ``--n`` images: cGAN labels
   round-robin, CycleGAN ``--n`` PNG inputs translated X -> Y), with a deadline; a sampler
   reads the server's resident memory (the process and its children, from /proc) every
   50 ms.

The server runs with ganflow serve's limits (``--max-concurrency`` requests generated at
once, the rest waiting up to ``--queue-timeout`` s, then HTTP 503), so the 16-client rows
show what a crowd gets: a queue, then quick 503s, and bounded memory.

Reported per row: requests answered 200 / 503 / other (with the statuses), requests/s and
images/s (answered ones over the row's wall time), p50/p99 latency of the answered ones,
p99 latency of the 503s, and the server's peak RSS against its RSS at rest. Prints a
Markdown table and one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

FAMILIES = ("cgan", "cyclegan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- memory of a process tree, from /proc --------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in task.read_text().split()]
    return out


def tree_rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` and all its descendants, in MB; None off Linux."""
    if not Path("/proc/self/status").exists():
        return None
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        todo += _children(p)
    return total / 1024


class PeakSampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0.0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = tree_rss_mb(self.pid)
            if rss is not None:
                self.peak = max(self.peak, rss)
            self._stop_event.wait(self.every)

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return self.peak


# --- the champions -------------------------------------------------------------------------


def _cgan_config(steps: int):
    from gan_core.presets import DataFacts, config_for_data

    facts = DataFacts("labelled", 32, 3, ("circle", "square", "triangle"), name="shapes")
    over = {"train.steps": steps, "train.batch_size": 16, "eval.every": 0}
    return config_for_data("cgan", facts, over)


def _cyclegan_config(steps: int):
    from gan_core.presets import DataFacts, config_for_data

    facts = DataFacts("unpaired", 32, 3, name="colours")
    return config_for_data("cyclegan", facts, {"train.steps": steps, "eval.every": 0})


def register_champions(uri: str, artifacts: Path, steps: int = 2) -> dict[str, str]:
    """A briefly trained generator per family, logged and registered as the pipeline does,
    aliased champion. Returns {family: registered name}."""
    from mlflow import MlflowClient

    from flows import registry, tracking
    from flows.bench.quality_data import make_colours, make_shapes
    from gan_core.train import init_state, train

    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("serve-bench", artifact_location=artifacts.as_uri())
    out = {}
    for family in FAMILIES:
        if family == "cgan":
            cfg, data = _cgan_config(steps), make_shapes("train", 20)
        else:
            cfg, data = _cyclegan_config(steps), make_colours("train", 10)
        models = train(init_state(cfg, data, "cpu"), data).models
        run_id = client.create_run(exp, tags={"ganflow.snapshot_id": f"bench-{family}"}).info.run_id
        tracking.log_generator(uri, run_id, cfg, models)
        name = f"ganflow-{family}-serve-bench"
        version = registry.register(
            run_id, cfg, models, name, {"fd": 1.0}, f"bench-{family}", "bench", tracking_uri=uri
        )
        client.set_registered_model_alias(name, "champion", version)
        client.set_terminated(run_id)
        out[family] = name
    return out


# --- requests ------------------------------------------------------------------------------


def request_body(family: str, n: int, seed: int, fmt: str = "array") -> bytes:
    if family == "cgan":
        inputs: dict = {"labels": [i % 3 for i in range(n)], "seed": seed}
    else:
        from PIL import Image

        rng = np.random.default_rng(seed)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        png = base64.b64encode(buf.getvalue()).decode()
        inputs = {"images": [png] * n, "direction": "G"}
    return json.dumps({"inputs": inputs, "params": {"format": fmt}}).encode()


def _post(url: str, body: bytes, timeout: float) -> tuple[int, float, int]:
    """(HTTP status, seconds, images answered); status 0: no answer (connection error)."""
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            answer = json.loads(r.read())
            return r.status, time.perf_counter() - t0, len(answer["predictions"]["images"])
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, time.perf_counter() - t0, 0
    except (urllib.error.URLError, OSError):
        return 0, time.perf_counter() - t0, 0


def load_row(
    url: str,
    pid: int,
    family: str,
    fmt: str,
    clients: int,
    requests: int,
    n: int,
    deadline: float,
) -> dict:
    """``clients`` threads, each sending ``requests`` requests one after another."""
    bodies = [request_body(family, n, seed, fmt) for seed in range(clients)]
    results: list[tuple[int, float, int]] = []
    lock = threading.Lock()
    rest = tree_rss_mb(pid)
    sampler = PeakSampler(pid)
    sampler.start()
    start = time.perf_counter()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        for _ in range(requests):
            left = deadline - (time.perf_counter() - start)
            if left <= 0:
                return
            r = _post(url, bodies[i], timeout=left)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    peak = sampler.stop()
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    lat = np.array([r[1] for r in ok]) if ok else np.array([np.nan])
    busy_lat = np.array([r[1] for r in busy]) if busy else np.array([np.nan])
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r[0])] = statuses.get(str(r[0]), 0) + 1
    return {
        "family": family,
        "format": fmt,
        "clients": clients,
        "statuses": statuses,
        "images_per_request": n,
        "ok": len(ok),
        "busy_503": len(busy),
        "other": len(results) - len(ok) - len(busy),
        "not_sent": clients * requests - len(results),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 2),
        "images_per_s": round(sum(r[2] for r in ok) / wall, 1),
        "p50_s": round(float(np.percentile(lat, 50)), 3),
        "p99_s": round(float(np.percentile(lat, 99)), 3),
        "p99_503_s": round(float(np.percentile(busy_lat, 99)), 3),
        "rss_rest_mb": None if rest is None else round(rest),
        "rss_peak_mb": round(peak) if peak else None,
    }


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the scoring server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the scoring server did not answer /ping within {timeout:.0f} s")


def serve_family(uri: str, name: str, family: str, args, log) -> list[dict]:
    from flows.registry.serve import plan

    p = plan(
        name, port=_free_port(), workers=args.workers, tracking_uri=uri,
        max_concurrency=args.max_concurrency, queue_timeout=args.queue_timeout,
    )  # fmt: skip
    env = {**p.env, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(p.argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = []
    try:
        _wait_ready(p.url.rsplit("/", 1)[0], proc)
        _post(p.url, request_body(family, 8, 0), 120)  # warm up (first-call costs)
        for fmt in args.formats:
            for clients in args.clients:
                log(f"{family}, {fmt}: {clients} client(s) x {args.requests} of {args.n} images")
                row = load_row(
                    p.url, proc.pid, family, fmt, clients, args.requests, args.n, args.deadline
                )
                rows.append(row)
                log(f"  {json.dumps(row)}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| family | format | clients | 200 | 503 | other | req/s | images/s | p50 s | p99 s | "
        "p99 of 503s s | RSS at rest MB | peak RSS MB |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        other = {k: v for k, v in r["statuses"].items() if k not in ("200", "503")}
        if r["not_sent"]:
            other["not sent"] = r["not_sent"]
        lines.append(
            f"| {r['family']} | {r['format']} | {r['clients']} | {r['ok']} | {r['busy_503']} | "
            f"{' '.join(f'{k}: {v}' for k, v in other.items()) or 0} | "
            f"{r['requests_per_s']} | {r['images_per_s']} | {r['p50_s']} | {r['p99_s']} | "
            f"{r['p99_503_s']} | {r['rss_rest_mb']} | {r['rss_peak_mb']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m flows.bench.serve", description=__doc__)
    ap.add_argument("--families", default=",".join(FAMILIES), help="cgan,cyclegan")
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients per row")
    ap.add_argument("--requests", type=int, default=3, help="requests per client per row")
    ap.add_argument("--formats", default="array,png", help="answer formats: array,png")
    ap.add_argument("--n", type=int, default=1024, help="images per request (at most 1,024)")
    ap.add_argument("--workers", type=int, default=1, help="server processes")
    ap.add_argument("--max-concurrency", type=int, default=None, help="ganflow serve's slots")
    ap.add_argument("--queue-timeout", type=float, default=None, help="ganflow serve's wait")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds per row at most")
    args = ap.parse_args(argv)
    from flows.registry.serve import DEFAULT_MAX_CONCURRENCY, DEFAULT_QUEUE_TIMEOUT

    args.families = [f for f in args.families.split(",") if f]
    bad = sorted(set(args.families) - set(FAMILIES))
    if bad:
        ap.error(f"--families: unknown {bad}; choose from {list(FAMILIES)}")
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.max_concurrency is None:
        args.max_concurrency = DEFAULT_MAX_CONCURRENCY
    if args.queue_timeout is None:
        args.queue_timeout = DEFAULT_QUEUE_TIMEOUT
    args.formats = [f for f in args.formats.split(",") if f]
    if not args.formats or set(args.formats) - {"array", "png"}:
        ap.error(f"--formats: a comma list of array, png; got {args.formats}")
    if not 1 <= args.n <= 1024:
        ap.error(f"--n must be in 1..1024, got {args.n}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{(time.monotonic() - t0) / 60:5.1f} min] {msg}", file=sys.stderr, flush=True)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ganflow-serve-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        log("training and registering a cGAN and a CycleGAN champion")
        os.environ.setdefault("GANFLOW_HOME", str(Path(tmp) / "home"))
        names = register_champions(uri, Path(tmp) / "artifacts")
        for family in args.families:
            rows += serve_family(uri, names[family], family, args, log)
    out = {
        "n": args.n,
        "workers": args.workers,
        "max_concurrency": args.max_concurrency,
        "queue_timeout": args.queue_timeout,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    print(table(rows))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
