"""The data path at scale: `python -m flows.bench.data memory|throughput` (prints a table).

``memory [--sizes 5000,20000,80000] [--image-size 64]``: for each size, a snapshot of that
many generated RGB images (uint8, format 3) is written to a temporary root; then one fresh
process per mode opens the train split as a training worker does and runs a few Algorithm 1
iterations of the 64 px DCGAN preset (narrowed: memory, not speed, is measured here):

- ``before``: the whole split in memory as float32 on the worker's device (what every worker
  did before format 3: its snapshots held float32 and workers loaded them whole);
- ``after``: rows read by index from the node's verified local copy, one minibatch at a time.

Reported per process: peak resident memory (VmHWM), resident anonymous memory at the end
(RssAnon: the process's own), file-backed resident memory (RssFile), and on CUDA the peak
device memory allocated. The split's bytes are shown next to them. After, memory must not
grow with the dataset; what the reads bring into the kernel's page cache is not counted in
any process (shared by the node's workers, reclaimable).

``throughput [--image-size 64] [--batch-size 64] [--steps 30]``: on one snapshot, minibatches
per second the data path alone delivers (draw, read ahead, move to the device, scale,
augment: gan_core's Feeder), against iterations per second the training step consumes with
the same Feeder, and the share of training time the loop waited on data (Feeder.wait_s).

Prints the table and one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def _status() -> dict[str, float]:
    """VmHWM, RssAnon, RssFile of this process in MiB (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
    return out


def make_snapshot(root: str, n: int, size: int, seed: int = 0) -> str:
    """A format-3 snapshot of n generated RGB images (10 labelled classes) in root; its id.
    Written in chunks through the store, as ingest writes, without decoding files."""
    from flows.ingest.stages import PIXEL_RULE
    from flows.snapshots.manifest import FORMAT_VERSION, Manifest
    from flows.snapshots.store import Store, digest

    rng = np.random.default_rng(seed)
    # Smooth random fields (not white noise), so the pixels look like images to the models.
    base = rng.integers(0, 256, size=(n, 3, size // 8, size // 8), dtype=np.uint8)
    images = base.repeat(8, axis=2).repeat(8, axis=3)
    labels = (np.arange(n) % 10).astype(np.int64)
    n_test = max(10, n // 10)
    parts = {
        "train": {"images": images[n_test:], "labels": labels[n_test:]},
        "test": {"images": images[:n_test], "labels": labels[:n_test]},
    }
    sid = digest({"bench": n, "size": size, "seed": seed, "format": FORMAT_VERSION})[:20]
    store = Store(root)
    if store.manifest(sid) is None:
        manifest = Manifest(
            id=sid,
            name=f"bench-{n}",
            source="generated",
            kind="images",
            layout="classes",
            image_size=size,
            channels=3,
            pixels="uint8",
            preprocessing={"pixels": PIXEL_RULE},
            num_images=n,
            counts={},
            split_counts={"train": {}, "val": {}, "test": {}},
            classes=[str(c) for c in range(10)],
        )
        store.write_snapshot(manifest, parts)
        store.add_refs(manifest, f"bench-{n}", None)
    return sid


def _bench_config(size: int, batch_size: int, steps: int, narrow: bool):
    from gan_core.overrides import apply_overrides
    from gan_core.presets import DataFacts, config_for_data

    facts = DataFacts("labelled", size, 3, tuple(str(c) for c in range(10)), name="bench")
    cfg = config_for_data("cgan", facts)
    sets = {
        "train.batch_size": batch_size,
        "train.steps": steps,
        "train.log_every": steps,
        "train.device": "auto",
        "train.precision": "fp32",
    }
    if narrow:
        sets.update({"model.ngf": 8, "model.ndf": 8})
    return apply_overrides(cfg, sets)


def probe(root: str, sid: str, mode: str, steps: int) -> dict:
    """One worker's data + a few iterations; memory figures of this process."""
    import torch

    from flows.snapshots.load import load_dataset, open_dataset
    from gan_core.train import init_state, resolve_device, train

    torch.set_num_threads(1)
    cfg = _bench_config(open_dataset(sid, "train", root).images.shape[-1], 64, steps, True)
    device = resolve_device(cfg.train.device)
    if mode == "before":
        data = load_dataset(sid, "train", root).to(device)  # float32, whole split
    else:
        data = open_dataset(sid, "train", root).to(device)  # rows on the host, read by index
    state = init_state(cfg, data, device)
    train(state, data)
    out = {"mode": mode, "n": len(data), **_status()}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def memory(sizes: list[int], size: int, steps: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ganflow-bench-data-") as tmp:
        env = {**os.environ, "GANFLOW_HOME": os.path.join(tmp, "home")}
        root = os.path.join(tmp, "store")
        for n in sizes:
            sid = make_snapshot(root, n, size)
            for mode in ("before", "after"):
                cmd = [sys.executable, "-m", "flows.bench.data", "_probe", root, sid, mode]
                res = subprocess.run(
                    [*cmd, str(steps)], env=env, capture_output=True, text=True, check=False
                )
                if res.returncode != 0:
                    raise SystemExit(f"probe {mode} n={n} failed: {res.stderr.strip()[-2000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row["split_mib_uint8"] = row["n"] * 3 * size * size / 2**20
                rows.append(row)
                _print_memory_row(row)
    return rows


def _print_memory_row(r: dict) -> None:
    cuda = f"{r['cuda_peak_mib']:10.0f}" if "cuda_peak_mib" in r else f"{'n/a':>10}"
    print(
        f"{r['n']:>8} {r['mode']:>7} {r['split_mib_uint8']:>10.0f} {r['VmHWM']:>10.0f} "
        f"{r['RssAnon']:>10.0f} {r['RssFile']:>9.0f} {cuda}",
        flush=True,
    )


def throughput(size: int, batch_size: int, steps: int, n: int) -> dict:
    """Data path alone vs the training step on one generated snapshot (in a temporary root;
    the node cache's verification note lands under GANFLOW_HOME/cache)."""
    import torch

    from flows.snapshots.load import open_dataset
    from gan_core.train import FAMILIES, Feeder, init_state, resolve_device, train

    with tempfile.TemporaryDirectory(prefix="ganflow-bench-data-") as tmp:
        root = os.path.join(tmp, "store")
        sid = make_snapshot(root, n, size)
        cfg = _bench_config(size, batch_size, steps, False)
        device = resolve_device(cfg.train.device)
        data = open_dataset(sid, "train", root).to(device)
        state = init_state(cfg, data, device)

        # The data path alone: what the loop would get if the step took no time at all.
        feeder = Feeder(state, data)
        for _ in range(5):  # warm: thread start, first reads
            feeder.next()
        batches = max(200, 20 * steps)
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = feeder.next()
        if device.type == "cuda":
            torch.cuda.synchronize()
        data_s = time.perf_counter() - t0
        feeder.close()
        del batch

        # The training step consuming the same Feeder; train() reports the time it waited.
        waits: list[float] = []
        state = init_state(cfg, data, device)
        train(state, data, until=2)  # warm-up
        t0 = time.perf_counter()
        train(state, data, callbacks=[lambda s, m: waits.append(m.get("data_wait_s", 0.0))])
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
        done = cfg.train.steps - 2
        per_it = cfg.train.d_steps + (1 if FAMILIES[cfg.family].g_uses_data else 0)
        return {
            "device": str(device),
            "image_size": size,
            "batch_size": batch_size,
            "rows": len(data),
            "data_batches_per_s": batches / data_s,
            "train_batches_per_s": done * per_it / train_s,
            "train_iterations_per_s": done / train_s,
            "data_wait_share": sum(waits) / train_s,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.bench.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory", help="per-worker memory against dataset size, before/after")
    m.add_argument("--sizes", default="5000,20000,80000")
    m.add_argument("--image-size", type=int, default=64)
    m.add_argument("--steps", type=int, default=4)
    t = sub.add_parser("throughput", help="data path vs training step, minibatches/s")
    t.add_argument("--image-size", type=int, default=64)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--steps", type=int, default=12)
    t.add_argument("--rows", type=int, default=20000)
    pr = sub.add_parser("_probe")
    pr.add_argument("root")
    pr.add_argument("sid")
    pr.add_argument("mode", choices=("before", "after"))
    pr.add_argument("steps", type=int)
    a = p.parse_args(argv)
    if a.cmd == "_probe":
        print(json.dumps(probe(a.root, a.sid, a.mode, a.steps)))
        return 0
    if a.cmd == "memory":
        sizes = [int(s) for s in a.sizes.split(",")]
        print(f"per-worker memory, {a.image_size} px RGB, MiB (one process per row)")
        print(
            f"{'images':>8} {'mode':>7} {'split u8':>10} {'peak RSS':>10} {'RssAnon':>10} "
            f"{'RssFile':>9} {'CUDA peak':>10}"
        )
        rows = memory(sizes, a.image_size, a.steps)
        print(json.dumps({"memory": rows}))
        return 0
    with tempfile.TemporaryDirectory(prefix="ganflow-bench-home-") as home:
        os.environ["GANFLOW_HOME"] = home
        r = throughput(a.image_size, a.batch_size, a.steps, a.rows)
    print(
        f"data path vs training step, {r['image_size']} px RGB, batch {r['batch_size']}, "
        f"{r['rows']} rows, {r['device']}"
    )
    print(f"  data path alone        {r['data_batches_per_s']:10.1f} minibatches/s")
    print(
        f"  training consumes      {r['train_batches_per_s']:10.1f} minibatches/s "
        f"({r['train_iterations_per_s']:.2f} iterations/s)"
    )
    print(f"  headroom               {r['data_batches_per_s'] / r['train_batches_per_s']:10.1f}x")
    print(f"  loop waiting on data   {100 * r['data_wait_share']:10.2f} % of training time")
    print(json.dumps({"throughput": r}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
