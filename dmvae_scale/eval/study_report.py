"""A study's report: generators on different latent spaces (and seeds) side by side, with their tokenizers.

`write_study_report` takes plain rows (one per evaluated generator: its tags, gFID, classifier accuracy, ...), the
tokenizers' reconstruction metrics, loss curves and sample grids, and writes `report.md`, a self-contained
`report.html` (images inlined) and `loss_curves.png` into a directory. Groups are formed by a tag (the latent space):
each metric is summarised as mean and spread (min..max) over its seeds, and the targets are checked against the
measured numbers as they are: a missed target is reported with its margin.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import UserError
from .paired import compare_arms

PAIRED_METRICS = ("fid", "kid", "classifier_accuracy", "fd_classifier")


def _fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _md_cell(v: Any) -> str:
    """A value as one Markdown table cell: shown as it is (HTML escaping belongs to the HTML page only), with the
    characters that would end the cell or the row escaped."""
    return str(v).replace("|", "\\|").replace("\n", " ")


def _kid(r: dict) -> str:
    return "nan" if r.get("kid") is None else f"{r['kid']:.4f} ± {r.get('kid_se', float('nan')):.4f}"


def _fd_classifier(r: dict) -> str:
    """FD on the evaluator classifier's features (lower is better); "not computed" when the eval gave none (too
    few samples for its feature dimension, or no classifier)."""
    return "not computed" if r.get("fd_classifier") is None else f"{r['fd_classifier']:.3f}"


def group_summary(rows: list[dict], by: str, metrics: tuple[str, ...]) -> dict[str, dict[str, dict[str, float]]]:
    """{group: {metric: {mean, min, max, n}}} over the rows of each group."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for group in sorted({r[by] for r in rows}):
        members = [r for r in rows if r[by] == group]
        out[group] = {}
        for m in metrics:
            vals = [float(r[m]) for r in members if m in r and r[m] is not None]
            if vals:
                out[group][m] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals)),
                                 "n": len(vals)}
    return out


def check_targets(summary: dict, rows: list[dict], ours: str, baseline: str,
                  min_accuracy: float = 0.70, by: str = "latent_space") -> list[dict]:
    """The demo's targets, measured: every generator's classifier accuracy >= min_accuracy; our mean gFID below the
    baseline's (with the seeds' spread shown); and, with two or more paired seeds, whether the paired interval shows
    it."""
    targets = []
    accs = [(r["name"], r.get("classifier_accuracy")) for r in rows]
    worst = min((a for _, a in accs if a is not None), default=float("nan"))
    targets.append({"target": f"every generator's samples classified as their class >= {min_accuracy:.0%}",
                    "met": bool(worst >= min_accuracy), "measured": f"lowest {worst:.1%} "
                    f"({', '.join(f'{n} {a:.1%}' for n, a in accs if a is not None)})"})
    if ours in summary and baseline in summary and "fid" in summary[ours] and "fid" in summary[baseline]:
        a, b = summary[ours]["fid"], summary[baseline]["fid"]
        targets.append({"target": f"{ours} gFID below {baseline} gFID at equal generator budget (means over seeds)",
                        "met": bool(a["mean"] < b["mean"]),
                        "measured": f"{ours} {a['mean']:.2f} (range {a['min']:.2f}..{a['max']:.2f}, {a['n']} seeds) "
                                    f"vs {baseline} {b['mean']:.2f} (range {b['min']:.2f}..{b['max']:.2f}, "
                                    f"{b['n']} seeds): {ours} - {baseline} {a['mean'] - b['mean']:+.2f}"})
        # The means can differ by chance: the claim is shown only where the paired interval over seeds lies below 0
        # (eval/paired.py), judged here beside the means so a "met" above is never read as more than it is.
        try:
            diff = compare_arms([r for r in rows if "seed" in r], ours, baseline, "fid", by=by)
        except UserError:
            diff = None
        if diff is not None and len(diff.seeds) >= 2:
            lo, hi = diff.interval
            targets.append({"target": f"{ours} gFID below {baseline} gFID, shown seed by seed ({diff.level:.0%} "
                                      "paired interval of the difference wholly below 0)",
                            "met": diff.verdict() == "holds",
                            "measured": f"{ours} - {baseline} {diff.mean:+.2f}, interval [{lo:+.2f}, {hi:+.2f}] "
                                        f"over {len(diff.seeds)} paired seeds: {diff.verdict()}"})
    return targets


def paired_table(rows: list[dict], ours: str, by: str) -> tuple[list[dict], list[str]]:
    """Our group against every other one, seed by seed (eval/paired.py), on each metric both have: (the differences'
    JSON, notes for comparisons that could not be made)."""
    out, notes = [], []
    for other in sorted({r[by] for r in rows} - {ours}):
        for metric in PAIRED_METRICS:
            if not any(r.get(metric) is not None for r in rows if r[by] in (ours, other)):
                continue
            try:
                diff = compare_arms([r for r in rows if "seed" in r], ours, other, metric, by=by)
            except UserError as exc:
                notes.append(f"paired {metric}, {ours} vs {other}: {exc}")
                continue
            if diff.seeds:
                out.append(diff.to_json())
    return out, notes


def check_half_budget(points: list[dict], ours: str, baseline: str, by: str = "latent_space") -> Optional[dict]:
    """The stretch target, measured: some checkpoint of ours at no more than half its generator's images has a gFID
    at or below the baseline's final gFID (mean over its seeds). None without such a checkpoint to judge."""
    early = [p for p in points if p.get(by) == ours and p["images"] * 2 <= p["total_images"] and p.get("fid")
             is not None]
    finals = [float(p["fid"]) for p in points if p.get(by) == baseline and p["images"] == p["total_images"]
              and p.get("fid") is not None]
    if not early or not finals:
        return None
    best = min(early, key=lambda p: float(p["fid"]))
    target = float(np.mean(finals))
    return {"target": f"{ours} reaches {baseline}'s final gFID with at most half the generator's images",
            "met": bool(float(best["fid"]) <= target),
            "measured": f"{best['name']} at {best['images']} of {best['total_images']} images: gFID "
                        f"{float(best['fid']):.2f} vs {baseline} final {target:.2f} (mean of {len(finals)} seeds at "
                        f"{max(p['total_images'] for p in points if p.get(by) == baseline)} images): "
                        f"difference {target - float(best['fid']):+.2f}"}


def plot_points(points: list[dict], path: Path) -> Optional[Path]:
    """gFID against generator images seen, one line per generator run (its checkpoints and its end)."""
    runs: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        if p.get("fid") is not None:
            runs.setdefault(p["name"], []).append((float(p["images"]), float(p["fid"])))
    if not any(len(v) > 1 for v in runs.values()):
        return None
    return plot_curves({k: sorted(v) for k, v in runs.items()}, path, "gFID", marker="o")


def plot_curves(curves: dict[str, list[tuple[float, float]]], path: Path, ylabel: str,
                marker: Optional[str] = None) -> Optional[Path]:
    """One line per run (images seen -> loss) in one PNG; None when there is nothing to draw."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, points in sorted(curves.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=name, linewidth=1.4, marker=marker)
    ax.set_xlabel("images seen")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def write_study_report(out_dir: str | Path, *, title: str, rows: list[dict], tokenizers: list[dict],
                       curves: dict[str, dict[str, list[tuple[float, float]]]], grids: dict[str, Path],
                       settings: dict[str, Any], group_by: str = "latent_space", ours: str = "dmvae",
                       baseline: str = "kl_vae", notes: list[str] = (), probes: list[dict] = (),
                       points: list[dict] = ()) -> dict:
    """Write report.md, report.html, the curves' PNGs and report.json; returns what report.json holds.

    `points`: gFID of generators at their end and at earlier checkpoints ({name, tags, images, total_images, fid,
    classifier_accuracy}); with an earlier checkpoint of ours, they add a gFID-vs-images plot, a table and the
    stretch target "ours reaches the baseline's final gFID with at most half the images".

    `probes`: linear-probe reports of self-supervised teachers (eval/ssl_probe.py, with a "teacher" name); each
    adds a table and the target "the teacher beats raw pixels"."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = ("fid", "kid", "classifier_accuracy", "fd_classifier", "final_loss")
    summary = group_summary(rows, group_by, metrics) if rows else {}
    targets = check_targets(summary, rows, ours, baseline, by=group_by) if rows else []
    paired, paired_notes = paired_table(rows, ours, group_by) if rows else ([], [])
    notes = [*notes, *paired_notes]
    paired_header = ["metric", "difference", "mean", "interval", "paired seeds", "verdict"]
    paired_rows = [[d["metric"], f"{d['a']} - {d['b']}", f"{d['mean']:+.3f}",
                    f"[{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]", len(d["seeds"]), d["verdict"]]
                   for d in paired]
    half = check_half_budget(list(points), ours, baseline, group_by)
    if half is not None:
        targets.append(half)
    for p in probes:
        acc = {k: v["accuracy"] for k, v in p["results"].items()}
        targets.append({"target": f"teacher {p['teacher']}: a linear probe on its features beats one on raw pixels",
                        "met": bool(acc["SSL teacher"] > acc["raw pixels"]),
                        "measured": f"{acc['SSL teacher']:.1%} vs {acc['raw pixels']:.1%} "
                                    f"({p['train_images']} training, {p['test_images']} test images)"})
    point_header = ["generator", group_by, "seed", "images", "fid", "classifier_accuracy"]
    point_rows = [[p["name"], p.get(group_by, ""), p.get("seed", ""), p["images"], p.get("fid", float("nan")),
                   p.get("classifier_accuracy", float("nan"))]
                  for p in sorted(points, key=lambda p: (str(p.get(group_by)), p["name"], p["images"]))] \
        if any(p["images"] < p["total_images"] for p in points) else []
    probe_rows = [[p["teacher"], name, r["dim"], f"{r['accuracy']:.1%}", p["train_images"], p["test_images"]]
                  for p in probes for name, r in p["results"].items()]
    probe_header = ["teacher", "representation", "dim", "probe accuracy", "train images", "test images"]
    grid_header, grid_rows = [], []  # pooled/patch features x linear/kNN probes, when the reports carry the table
    if any("table" in p for p in probes):
        from .ssl_probe import PROBE_TABLE_HEADER, probe_table_rows
        grid_header = ["teacher", *PROBE_TABLE_HEADER]
        grid_rows = [[p["teacher"], *row] for p in probes if "table" in p for row in probe_table_rows(p)]
    pngs = {}
    for kind, per_run in curves.items():
        p = plot_curves(per_run, out / f"curves_{kind.replace(' ', '_')}.png", kind)  # no spaces: Markdown links
        if p is not None:
            pngs[kind] = p
    p = plot_points(list(points), out / "curves_gfid_over_training.png") if point_rows else None
    if p is not None:
        pngs["gFID over training"] = p

    md = [f"# {title}", ""]
    md += ["## Generators", "", "| generator | " + " | ".join(k for k in ("latent_space", "seed", "samples", "fid",
                                                                              "kid ± se", "classifier_accuracy",
                                                                              "fd_classifier", "final_loss")) +
           " |", "|" + "---|" * 9]
    for r in rows:
        md.append(f"| {r['name']} | {r.get('latent_space', '')} | {r.get('seed', '')} | {r.get('samples', '')} | "
                  f"{_fmt(r.get('fid', float('nan')))} | {_kid(r)} | "
                  f"{_fmt(r.get('classifier_accuracy', float('nan')), 3)} | "
                  f"{_fd_classifier(r)} | "
                  f"{_fmt(r.get('final_loss', float('nan')), 4)} |")
    if summary:
        md += ["", "Mean over seeds (range):", ""]
        for group, ms in summary.items():
            parts = [f"{m} {v['mean']:.3f} ({v['min']:.3f}..{v['max']:.3f}, n={v['n']})" for m, v in ms.items()]
            md.append(f"- **{group}**: " + "; ".join(parts))
    if paired_rows:
        level = paired[0]["level"]
        md += ["", f"## Paired differences by seed ({level:.0%} intervals: the wider of a bootstrap over seed pairs "
                   f"and Student's t; a verdict holds only when the interval excludes 0)", "",
               "| " + " | ".join(paired_header) + " |", "|" + "---|" * len(paired_header)]
        md += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in paired_rows]
    if tokenizers:
        md += ["", "## Tokenizers (reconstructions of real test images)", "",
               "| tokenizer | rFID | PSNR | SSIM | images |", "|---|---|---|---|---|"]
        for t in tokenizers:
            md.append(f"| {t['name']} | {_fmt(t.get('rfid', float('nan')))} | {_fmt(t.get('psnr', float('nan')))} | "
                      f"{_fmt(t.get('ssim', float('nan')), 4)} | {t.get('images', '')} |")
    if point_rows:
        md += ["", "## gFID over training (checkpoints and ends)", "", "| " + " | ".join(point_header) + " |",
               "|" + "---|" * len(point_header)]
        md += ["| " + " | ".join(_fmt(c, 3) if i == 5 else _fmt(c) for i, c in enumerate(row)) + " |"
               for row in point_rows]
    if probe_rows:
        md += ["", "## Self-supervised teacher (linear probe, Fashion-MNIST test split)", "",
               "| " + " | ".join(probe_header) + " |", "|" + "---|" * len(probe_header)]
        md += ["| " + " | ".join(str(c) for c in row) + " |" for row in probe_rows]
    if grid_rows:
        md += ["", "## Self-supervised teacher vs random init (linear and kNN probes, pooled and patch features)", "",
               "| " + " | ".join(grid_header) + " |", "|" + "---|" * len(grid_header)]
        md += ["| " + " | ".join(str(c) for c in row) + " |" for row in grid_rows]
    if targets:
        md += ["", "## Targets (measured, never tuned to)", "", "| target | met | measured |", "|---|---|---|"]
        for t in targets:
            md.append(f"| {t['target']} | {'yes' if t['met'] else 'NO'} | {t['measured']} |")
    md += ["", "## Curves", ""] + [f"![{k}]({p.name})" for k, p in pngs.items()]
    md += ["", "## Samples", ""] + [f"**{name}**\n\n![{name}]({p.name})\n" for name, p in grids.items()]
    md += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    md += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in settings.items()]
    if notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (out / "report.md").write_text("\n".join(md) + "\n")

    (out / "report.html").write_text(_html(title, rows, summary, tokenizers, targets, pngs, grids, settings, notes,
                                           (probe_header, probe_rows), (point_header, point_rows),
                                           (paired_header, paired_rows), (grid_header, grid_rows)))
    report = {"title": title, "rows": rows, "summary": summary, "paired": paired, "tokenizers": tokenizers,
              "targets": targets,
              "probes": list(probes), "points": list(points),
              "settings": settings, "files": sorted(p.name for p in out.iterdir())}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _table(header: list[str], body: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c) if isinstance(c, float) else str(c))}</td>"
                                    for c in row) + "</tr>" for row in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _html(title, rows, summary, tokenizers, targets, pngs, grids, settings, notes, probe_table, point_table,
          paired_table_=((), ()), grid_table=((), ())) -> str:
    """The same report as one self-contained page (images inlined as data URLs)."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}.side{display:flex;gap:16px;flex-wrap:wrap}"
             ".side div{flex:1;min-width:260px}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    keys = ("latent_space", "seed", "samples", "fid", "kid", "classifier_accuracy", "fd_classifier", "final_loss")
    cell = {"kid": _kid, "fd_classifier": _fd_classifier}
    parts += ["<h2>Generators</h2>", _table(["generator", *keys[:4], "kid ± se", *keys[5:]],
                                            [[r["name"], *[cell[k](r) if k in cell else r.get(k, "") for k in keys]]
                                             for r in rows])]
    if summary:
        parts.append("<ul>" + "".join(
            f"<li><b>{html.escape(g)}</b>: " + "; ".join(f"{m} {v['mean']:.3f} ({v['min']:.3f}..{v['max']:.3f}, "
                                                        f"n={v['n']})" for m, v in ms.items()) + "</li>"
            for g, ms in summary.items()) + "</ul>")
    if paired_table_[1]:
        parts += ["<h2>Paired differences by seed</h2>", _table(*paired_table_)]
    if tokenizers:
        parts += ["<h2>Tokenizers</h2>", _table(["tokenizer", "rFID", "PSNR", "SSIM", "images"],
                                                [[t["name"], t.get("rfid", ""), t.get("psnr", ""), t.get("ssim", ""),
                                                  t.get("images", "")] for t in tokenizers])]
    if point_table[1]:
        parts += ["<h2>gFID over training (checkpoints and ends)</h2>", _table(*point_table)]
    if probe_table[1]:
        parts += ["<h2>Self-supervised teacher (linear probe, Fashion-MNIST test split)</h2>", _table(*probe_table)]
    if grid_table[1]:
        parts += ["<h2>Self-supervised teacher vs random init (linear and kNN probes, pooled and patch features)</h2>",
                  _table(*grid_table)]
    if targets:
        parts += ["<h2>Targets (measured, never tuned to)</h2>",
                  _table(["target", "met", "measured"], [[t["target"], "yes" if t["met"] else "NO", t["measured"]]
                                                         for t in targets])]
    if pngs:
        parts += ["<h2>Curves</h2>"] + [_img_tag(p, k) for k, p in pngs.items()]
    if grids:
        parts += ["<h2>Samples</h2>", "<div class='side'>"] + [
            f"<div><h3>{html.escape(n)}</h3>{_img_tag(p, n)}</div>" for n, p in grids.items()] + ["</div>"]
    parts += ["<h2>Settings</h2>", _table(["setting", "value"], [[k, v] for k, v in settings.items()])]
    if notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{html.escape(n)}</li>" for n in notes] + ["</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)
