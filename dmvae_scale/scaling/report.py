"""The scaling report: per latent space, loss and gFID against training compute, one curve per generator size, the
compute-optimal frontier and the fitted saturating power law; PNGs and a report.md next to the results table.

    write_report(rows, out_dir)   # rows: the sweep table (dicts with latent, size, params, train_flops, metrics)

The law is fitted to the frontier points (the best run at each budget) when there are at least 3 of them, else to
all points of that latent space; the report says which.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from .fit import FitError, PowerLaw, bootstrap_exponent, compute_frontier, optimal_size_exponent

METRICS = {"final_loss": "final training loss", "gfid": "gFID"}


def _finite(value) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fit_metric(rows: Sequence[dict], metric: str, bootstrap: int = 500) -> dict:
    """Frontier and law for one metric over rows of one latent space."""
    pts = [(float(r["train_flops"]), _finite(r.get(metric)), str(r["size"]), _finite(r.get("params")))
           for r in rows if _finite(r.get(metric)) is not None and _finite(r.get("train_flops"))]
    frontier = compute_frontier(pts)
    on = frontier if len({f.compute for f in frontier}) >= 3 else None
    source = "the frontier" if on else "all points"
    xs = [f.compute for f in on] if on else [p[0] for p in pts]
    ys = [f.loss for f in on] if on else [p[1] for p in pts]
    try:
        law: Optional[PowerLaw] = bootstrap_exponent(xs, ys, samples=bootstrap)
        error = None
    except FitError as exc:
        law, error = None, str(exc)
    return {"points": pts, "frontier": frontier, "law": law, "fitted_on": source, "error": error,
            "size_exponent": optimal_size_exponent(frontier)}


def _plot(results: dict, metric: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    latents = sorted(results)
    fig, axes = plt.subplots(1, len(latents), figsize=(6 * len(latents), 4.5), squeeze=False)
    for ax, latent in zip(axes[0], latents):
        res = results[latent]
        by_size = defaultdict(list)
        for c, v, size, _ in res["points"]:
            by_size[size].append((c, v))
        for size, pts in sorted(by_size.items(), key=lambda kv: min(p[0] for p in kv[1])):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"size {size}")
        if res["frontier"]:
            ax.plot([f.compute for f in res["frontier"]], [f.loss for f in res["frontier"]], "k--", lw=1,
                    label="compute-optimal frontier")
        if res["law"] is not None:
            xs = np.geomspace(min(p[0] for p in res["points"]), max(p[0] for p in res["points"]), 100)
            ax.plot(xs, res["law"](xs), "r-", lw=1.5, alpha=0.7, label=f"fit, b = {res['law'].b:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel("training compute (FLOPs)")
        ax.set_ylabel(METRICS[metric])
        ax.set_title(f"{METRICS[metric]} vs compute, latents: {latent}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


TABLE_COLUMNS = ("point", "latent", "size", "params", "images_seen", "train_flops", "final_loss", "gfid",
                 "images_per_s", "mfu", "wall_s", "status")


def write_report(rows: Sequence[dict], out_dir: str | Path, bootstrap: int = 500) -> dict:
    """Fits, PNGs and report.md for a sweep table; returns {metric: {latent: fit result}} and the plot paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = [r for r in rows if r.get("status") == "done"]
    by_latent = defaultdict(list)
    for r in done:
        by_latent[str(r.get("latent") or "default")].append(r)
    fits: dict[str, dict] = {}
    plots: list[str] = []
    md = ["# Scaling report", "", f"{len(done)} finished points of {len(rows)}.", "", "## Results", ""]
    md += _table(rows, TABLE_COLUMNS)
    for metric, label in METRICS.items():
        results = {lat: fit_metric(rs, metric, bootstrap) for lat, rs in by_latent.items()
                   if any(_finite(r.get(metric)) is not None for r in rs)}
        if not results:
            continue
        fits[metric] = results
        path = out / f"{metric}_vs_compute.png"
        _plot(results, metric, path)
        plots.append(str(path))
        md += ["", f"## {label} against compute", "", f"![{label}]({path.name})", ""]
        for latent, res in sorted(results.items()):
            md.append(f"### latents: {latent}")
            if res["law"] is not None:
                md.append(f"- fit on {res['fitted_on']} ({res['law'].points} points): {res['law'].describe()}")
            else:
                md.append(f"- no fit: {res['error']}")
            md.append("- frontier: " + ", ".join(f"{f.label} at {f.compute:.3g} FLOPs ({f.loss:.4g})"
                                                 for f in res["frontier"]))
            if res["size_exponent"] is not None:
                md.append(f"- compute-optimal size grows as C^{res['size_exponent']:.2f} along the frontier")
            md.append("")
    (out / "report.md").write_text("\n".join(md) + "\n")
    return {"fits": fits, "plots": plots, "report": str(out / "report.md")}
