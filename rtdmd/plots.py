"""Small matplotlib helpers (Agg backend: no display needed). matplotlib is imported on first use (slow to import)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_points(points: np.ndarray, labels: list[str], path: Path, title: str = "") -> Path:
    """Scatter 2-D samples (toy2d), one colour per distinct prompt."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for lab in sorted(set(labels)):
        idx = [i for i, l in enumerate(labels) if l == lab]
        ax.scatter(points[idx, 0], points[idx, 1], s=4, alpha=0.6, label=lab or "(unconditional)")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
