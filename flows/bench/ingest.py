"""Ingest throughput in images per second: `python -m flows.bench.ingest [--images N]`.

Writes N small PNGs (scikit-learn digits upscaled to 32x32, in 10 class folders), then times
the plain pipeline (no Prefect) from a local folder and from an S3 API: moto's server on
127.0.0.1 through s3fs (moto is a dev dependency), or a real endpoint when
GANFLOW_S3_ENDPOINT_URL and a writable bucket (--bucket) are given. Each source is ingested
into a fresh local store (cold), then again (the no-op re-ingest). With --large N, N larger
photos-like PNGs (256x256 RGB) are ingested down to 32x32 in a child process, which reports its
peak resident memory: decoding shrinks each chunk as it arrives, so memory follows the stored
size, not the source's pixels. With --driver-memory N,M,... N (then M ...) 64x64 RGB PNGs
are ingested at their size, locally and on Ray (``cluster=yes``: a local Ray on this machine,
standing in for a cluster), each in a child process that reports the driver's own peak
resident memory and the seconds taken: locally the driver holds every stored pixel before
writing; on the cluster the pixels go from the decode tasks to the write tasks through Ray's
object store and the driver holds metadata only. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path


def _make_pngs(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    b = load_digits()
    for i in range(n):
        k = i % len(b.images)
        arr = (b.images[k] * 15).astype(np.uint8)
        img = Image.fromarray(arr).resize((32, 32), Image.Resampling.NEAREST)
        d = folder / str(b.target[k])
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (d / f"{i:06d}.png").write_bytes(buf.getvalue())


def _make_large_pngs(folder: Path, n: int, side: int) -> None:
    """Smooth RGB gradients (compressible, like photos more than noise), 10 class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        a, b, c = rng.random(3)
        arr = np.stack([np.sin(6 * (xx * a + yy * b)), np.cos(5 * xx * c), 2 * yy - 1], -1)
        d = folder / str(i % 10)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((arr + 1) * 127.5).astype(np.uint8)).save(d / f"{i:06d}.png")


def _large_child(src: str, workers: int) -> None:
    """Runs in its own process so that its peak resident memory is the ingest's alone."""
    import resource

    from flows.ingest.runner import ingest
    from flows.ingest.stages import IngestOptions

    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        r = ingest(src, root=root, workers=workers, options=IngestOptions(image_size=32))
        seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": r.num_images, "seconds": seconds, "peak_mb": peak_mb}))


def _time_large(n: int, side: int, workers: int) -> dict:
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "large"
        _make_large_pngs(src, n, side)
        source_mb = sum(p.stat().st_size for p in src.rglob("*.png")) / 2**20
        code = f"from flows.bench.ingest import _large_child; _large_child({str(src)!r}, {workers})"
        out = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return {
        "images": r["images"],
        "source": f"{side}x{side} RGB PNG, {source_mb:.0f} MB",
        "stored": "32x32",
        "images_per_s": round(r["images"] / r["seconds"], 1),
        "peak_rss_mb": round(r["peak_mb"]),
    }


def _driver_child(src: str, cluster: str) -> None:
    """One ingest in its own process: the driver's peak resident memory (Ray's workers and
    the decode pool are other processes) and the seconds taken, Ray's start-up excluded."""
    import resource

    from flows.ingest.runner import ingest

    if cluster == "yes":
        from flows.preflight import ensure_ray

        ensure_ray(log_to_driver=False)
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        r = ingest(src, root=root, workers=2, cluster=cluster)
        seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": r.num_images, "seconds": seconds, "peak_mb": peak_mb}))


def _driver_memory(sizes: list[int]) -> list[dict]:
    import subprocess
    import sys

    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "pngs"
            _make_large_pngs(src, n, 64)
            for cluster in ("no", "yes"):
                code = (
                    f"from flows.bench.ingest import _driver_child; "
                    f"_driver_child({str(src)!r}, {cluster!r})"
                )
                env = {**os.environ, "GANFLOW_HOME": str(Path(tmp) / "home")}
                env.pop("RAY_ADDRESS", None)
                out = subprocess.run(
                    [sys.executable, "-c", code],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                row = {
                    "images": r["images"],
                    "path": "cluster" if cluster == "yes" else "local",
                    "stored_mb": round(r["images"] * 64 * 64 * 3 / 2**20),
                    "driver_peak_rss_mb": round(r["peak_mb"]),
                    "seconds": round(r["seconds"], 1),
                }
                print(f"driver memory: {row}", flush=True)
                rows.append(row)
    return rows


def _time(source: str, root: str, workers: int) -> dict:
    from flows.ingest.runner import ingest
    from flows.ingest.stages import IngestOptions

    t0 = time.perf_counter()
    r = ingest(source, root=root, workers=workers, options=IngestOptions(image_size=32))
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = ingest(source, root=root, workers=workers, options=IngestOptions(image_size=32))
    noop = time.perf_counter() - t0
    assert again.reused and again.id == r.id
    n = r.num_images
    return {
        "images": n,
        "seconds": round(cold, 2),
        "images_per_s": round(n / cold, 1),
        "noop_s": round(noop, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--workers", type=int, default=0, help="decode processes (0: min(cpus, 8))")
    p.add_argument("--bucket", default="ganflow-bench")
    p.add_argument("--skip-s3", action="store_true")
    p.add_argument(
        "--large",
        type=int,
        default=2000,
        metavar="N",
        help="also ingest N 256x256 RGB PNGs down to 32x32 and report peak memory (0: skip)",
    )
    p.add_argument(
        "--driver-memory",
        metavar="N,M",
        help="only: the driver's peak memory ingesting N, M ... 64 px PNGs, local vs on Ray",
    )
    args = p.parse_args()
    import torch

    if args.driver_memory:
        rows = _driver_memory([int(x) for x in args.driver_memory.split(",")])
        print(json.dumps({"driver_memory": rows}))
        return

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "pngs"
        _make_pngs(src, args.images)
        results["local"] = _time(str(src), str(Path(tmp) / "store-local"), args.workers)
        print(f"local: {results['local']}", flush=True)
        if not args.skip_s3:
            server = None
            if not os.environ.get("GANFLOW_S3_ENDPOINT_URL"):
                import logging

                from moto.server import ThreadedMotoServer

                logging.getLogger("werkzeug").setLevel(logging.ERROR)
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
                server.start()
                host, port = server.get_host_and_port()
                os.environ.update(
                    GANFLOW_S3_ENDPOINT_URL=f"http://{host}:{port}",
                    AWS_ACCESS_KEY_ID="bench",
                    AWS_SECRET_ACCESS_KEY="bench",
                    AWS_DEFAULT_REGION="us-east-1",
                )
            from flows.storage import get_filesystem

            fs, _ = get_filesystem(f"s3://{args.bucket}")
            if not fs.exists(args.bucket):
                fs.mkdir(args.bucket)
            prefix = f"{args.bucket}/bench-{int(time.time())}"
            fs.pipe(
                {
                    f"{prefix}/{p.relative_to(src).as_posix()}": p.read_bytes()
                    for p in src.rglob("*.png")
                }
            )
            results["s3"] = _time(f"s3://{prefix}", str(Path(tmp) / "store-s3"), args.workers)
            print(f"s3:    {results['s3']}", flush=True)
            if server:
                server.stop()
    if args.large:
        results["large_local"] = _time_large(args.large, 256, args.workers)
        print(f"large: {results['large_local']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
