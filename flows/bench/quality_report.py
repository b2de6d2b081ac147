"""The quality benchmark's tables: one Markdown table per dataset (rows: runs), the notes
that say how to read them, and the JSON with every figure and config beside them."""

from __future__ import annotations

import json
import math
from pathlib import Path

from flows.bench.quality_data import SHAPES


def fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def row_values(family: str, r: dict) -> dict[str, object]:
    j, f = r["figures"]["judge"], r["figures"]
    vals: dict[str, object] = {
        "run": r["run"],
        "seed": r["seed"],
        "steps": r["steps"],
        "seconds": round(r["seconds"], 1),
        "it/s": r["steps_per_s"],
        "aug_p": r.get("aug_p"),
        "fd_thumb": f.get("fd_thumb"),
        "intra_fd_thumb": f.get("intra_fd_thumb"),
    }
    if family == "cyclegan":
        vals.update(
            {
                "truth_err_ratio": j.get("truth_error_ratio"),
                "label_pres": j.get("label_preservation"),
                "fd_translation": j.get("fd_translation"),
                "cycle_err": j.get("cycle_error"),
            }
        )
        return vals
    covered = j.get("classes_covered")
    vals.update(
        {
            "fd": j.get("fd"),
            "intra_fd": j.get("intra_fd"),
            "coverage": j.get("coverage"),
            "class_cov": j.get(
                "class_coverage", None if covered is None else f"{covered}/{len(SHAPES)}"
            ),
            "class_acc": j.get("class_accuracy"),
            "memo_px": f.get("memorisation"),
            "memo_judge": j.get("memorisation_ratio"),
        }
    )
    if family == "gan":
        vals["class_cov"] = None if covered is None else f"{covered}/{len(SHAPES)}"
    return vals


def table(family: str, rows: list[dict]) -> str:
    if not rows:
        return "(no runs)\n"
    values = [row_values(family, r) for r in rows]
    if len({r["seed"] for r in rows}) == 1:
        for v in values:
            v.pop("seed")
    cols = [c for c in values[0] if any(v[c] is not None for v in values)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v[c]) for c in cols) + " |" for v in values]
    return "\n".join(lines) + "\n"


_SUMMARY = {
    "cyclegan": ("truth_err_ratio", "label_pres", "fd_thumb", "intra_fd_thumb"),
    "cgan": ("fd", "intra_fd", "coverage", "class_acc", "fd_thumb", "intra_fd_thumb"),
    "gan": ("fd", "coverage", "fd_thumb"),
}


def summary(family: str, rows: list[dict]) -> str:
    """Mean ± standard deviation over seeds per run (only with more than one seed): one
    seed's ranking of two GAN recipes is often the seed's, not the recipe's."""
    if len({r["seed"] for r in rows}) < 2:
        return ""
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(row_values(family, r))
    cols = _SUMMARY[family]
    lines = ["| run | seeds | steps | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for run, vals in by_run.items():
        cells = []
        for c in cols:
            xs = [float(v[c]) for v in vals if isinstance(v[c], (int, float))]
            if not xs:
                cells.append("-")
                continue
            mean = sum(xs) / len(xs)
            sd = (sum((x - mean) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5
            cells.append(f"{fmt(mean)} ± {fmt(sd)}" if len(xs) > 1 else fmt(mean))
        steps = "/".join(sorted({str(v["steps"]) for v in vals}))
        lines.append(f"| {run} | {len(vals)} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_NOTES = """\
Lower is better for the distances, truth_err_ratio and cycle_err; higher for coverage,
class_cov, class_acc and label_pres; memo_px and memo_judge should stay near 1 (well below
1: copies of training images). fd_thumb / intra_fd_thumb: Fréchet distance between 8x8
colour thumbnails of samples and held-out images (no learned features), overall / mean
within each class; for CycleGAN of G(x) against held-out y and F(y) against x, averaged.
fd, intra_fd, coverage (Naeem et al.), class_cov, class_acc, memo_judge: gan_core's
evaluate() in the dataset's judge features. aug_p: the augmentation probability at the end
(ADA's adapted p, which starts at 0; empty without augmentation). memo_px: nearest-training-image pixel distance
of samples over that of held-out images. `@time` rows ran the defaults' steps times the
ratio of their speed to the defaults' (`speed_ratio` in the JSON), probed in alternating turns
just before the row; the seconds and it/s columns are as the (possibly shared) machine gave.
`best` rows: the same run's log point whose generator measured best on the val split (the
primary metric, behind the cGAN's class-accuracy gate: what ganflow registers), judged on
test like the last step; steps is that step, seconds the whole run's.
"""


def write_report(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    s = result["settings"]
    md = [
        "# ganflow quality benchmark\n\n",
        f"{s['threads']} thread(s); gan/cgan: ngf = ndf = {s['ngf']}, batch {s['batch']}, "
        f"{s['steps']} steps; CycleGAN: its 32 px preset, {s['cycle_steps']} steps; seeds "
        f"{s['seeds']}; {s['samples']} samples per evaluation; torch {s['torch']}.\n\n",
        _NOTES,
    ]
    for name, d in result["datasets"].items():
        md.append(
            f"\n## {name}: {d['family']}, {d['train_images']} training images "
            f"(judge accuracy on test {fmt(d['judge_accuracy'])})\n\n"
        )
        md.append(table(d["family"], d["runs"]))
        means = summary(d["family"], d["runs"])
        if means:
            md.append(f"\nOver seeds (mean ± sd):\n\n{means}")
        if d["skipped"]:
            skipped = "; ".join(f"{k} ({v})" for k, v in d["skipped"].items())
            md.append(f"\nNot run: {skipped}.\n")
        if d["runs"]:
            grids = ", ".join(f"[{r['run']}]({r['grid']})" for r in d["runs"])
            md.append(f"\nGrids ({d['runs'][0]['grid_caption']}): {grids}\n")
    (out / "results.md").write_text("".join(md))
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
