"""The scatter plot of the 2-D distribution-matching toy: reference samples vs the network's outputs."""
from __future__ import annotations

from pathlib import Path

from ..method.toy import ToyResult


def save_toy_scatter(result: ToyResult, path: str | Path, title: str = "") -> Path:
    """Two panels (before, after DM training), each with the reference behind the matched samples; PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ref = result.reference.cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.5), sharex=True, sharey=True)
    for ax, samples, label, sw in ((axes[0], result.before, "before", result.sw_before),
                                   (axes[1], result.after, "after", result.sw_after)):
        pts = samples.cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=3, alpha=0.4, color="tab:blue", label="reference")
        ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.4, color="tab:orange", label="matched")
        ax.set_title(f"{label} DM training (SW {sw:.3f})")
        ax.set_aspect("equal")
    axes[0].legend(loc="upper right", markerscale=4)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
