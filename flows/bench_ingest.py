"""Ingest throughput in images per second: `python -m flows.bench_ingest [--images N]`.

Writes N small PNGs (scikit-learn digits upscaled to 32x32, in 10 class folders), then times
the plain pipeline (no Prefect) from a local folder and from an S3 API: moto's server on
127.0.0.1 through s3fs (moto is a dev dependency), or a real endpoint when
GANFLOW_S3_ENDPOINT_URL and a writable bucket (--bucket) are given. Each source is ingested
into a fresh local store (cold), then again (the no-op re-ingest). A benchmark, not a test.
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


def _time(source: str, root: str, workers: int) -> dict:
    from flows.ingest import IngestOptions, ingest

    t0 = time.perf_counter()
    r = ingest(source, root=root, workers=workers, options=IngestOptions(image_size=32))
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = ingest(source, root=root, workers=workers, options=IngestOptions(image_size=32))
    noop = time.perf_counter() - t0
    assert again["reused"] and again["id"] == r["id"]
    n = r["num_images"]
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
    args = p.parse_args()
    import torch

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
    print(json.dumps(results))


if __name__ == "__main__":
    main()
