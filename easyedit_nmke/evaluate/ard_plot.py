"""MicroEdit's ARD distributions as a figure (the paper's Figure 3 b-c).

Histograms of the reconstruction distance of edit prompts, rephrases and locality
prompts before the first edit and at the last checkpoint, with the switch threshold
τ: inputs left of the line are routed through the SAE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Union

GROUP_LABELS = {"edit": "edit prompts", "gen": "rephrased prompts", "loc": "locality prompts"}


def plot_ard_distributions(result: Mapping[str, Any], path: Union[str, Path]) -> Path:
    """Write the figure for a run recorded with ``RunConfig(record_distances=True)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels: Dict[str, Mapping[str, Any]] = {}
    if result.get("routing_before"):
        panels["before editing"] = result["routing_before"]
    last = next((row for row in reversed(result.get("runs", [])) if "ard" in row.get("routing", {})), None)
    if last is not None:
        panels[f"after T={last['T']} edits"] = last["routing"]
    if not panels:
        raise ValueError("the run has no recorded ARD values (run with record_distances / --ard-plot)")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, report) in zip(axes[0], panels.items()):
        values = [v for group in report["ard"].values() for v in group if np.isfinite(v)]
        bins = np.linspace(0, max(values + [report["tau"]]) * 1.05, 40)
        for group, ard in report["ard"].items():
            finite = [v for v in ard if np.isfinite(v)]
            ax.hist(finite, bins=bins, alpha=0.55, label=GROUP_LABELS.get(group, group))
        ax.axvline(report["tau"], color="black", linestyle="--", label=f"τ = {report['tau']:.3g}")
        ax.set_title(title)
        ax.set_xlabel("ARD")
        ax.set_ylabel("inputs")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.get('alg', '')} on {result.get('model', '')}: reconstruction distance at the SAE")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
