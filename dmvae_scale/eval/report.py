"""What an evaluation leaves behind for a reader: a sample grid PNG and a short markdown report."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from .images import as_uint8_nchw


def save_grid(images, path: str | Path, max_images: int = 64, nrow: Optional[int] = None,
              value_range=None) -> Path:
    """The first `max_images` images (uint8, or float with value_range) tiled in a square-ish grid, as PNG."""
    x = as_uint8_nchw(images[:max_images], value_range)
    nrow = nrow or max(1, math.isqrt(len(x) - 1) + 1)
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(path)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def write_report(directory: str | Path, title: str, metrics: dict[str, Any], settings: dict[str, Any],
                 notes: list[str] = (), grid: Optional[Path] = None) -> Path:
    """`report.md` (metrics table, one table per nested dict such as the protocol, settings table, notes, grid) and
    `metrics.json` in `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if not isinstance(v, dict)]
    for name, table in ((k, v) for k, v in metrics.items() if isinstance(v, dict)):
        lines += ["", f"## {name.capitalize()}", "", "| key | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in table.items()]
    lines += ["", "## Settings", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in settings.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if grid is not None:
        lines += ["", f"![samples]({Path(grid).name})"]
    (d / "metrics.json").write_text(json.dumps({"metrics": metrics, "settings": settings, "notes": list(notes)},
                                               indent=2, default=_json_default))
    out = d / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _json_default(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return np.asarray(value).tolist()
    return str(value)
