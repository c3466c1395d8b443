"""PNG plots of a run's metrics: held-out accuracy against OPD wall time, and drift along rollouts."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402


def accuracy_vs_time(runs: dict[str, list[dict]], path: Path, *, target: float | None = None,
                     x: str = "wall_time") -> None:
    """One line per method: held-out accuracy at each evaluation against cumulative OPD seconds
    (x="wall_time") or tokens generated (x="tokens_generated_total")."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, metrics in runs.items():
        points = [(m.get(x, 0.0), m["accuracy"]) for m in metrics if "accuracy" in m]
        ax.plot(*zip(*points), marker="o", markersize=3, label=method)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.2f}")
    ax.set_xlabel({"wall_time": "OPD wall time (s, evaluation excluded)",
                   "tokens_generated_total": "student tokens generated"}.get(x, x))
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def drift_profiles(profiles: list[dict], path: Path, *, title: str = "", max_curves: int = 4) -> None:
    """Per completion position: mean top-k overlap, mean reward multiplier and the fraction of
    rollouts still generating, for a few steps spread over training (early = light, late = dark)."""
    if not profiles:
        return
    picks = profiles if len(profiles) <= max_curves else [
        profiles[round(i * (len(profiles) - 1) / (max_curves - 1))] for i in range(max_curves)]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), sharex=True)
    for i, prof in enumerate(picks):
        shade = plt.cm.viridis(0.15 + 0.7 * i / max(1, len(picks) - 1))
        for ax, key in zip(axes, ("overlap", "multiplier", "alive")):
            ax.plot(range(len(prof[key])), prof[key], color=shade, label=f"step {prof['step']}")
    for ax, label in zip(axes, ("top-k overlap (student vs teacher)", "reward multiplier", "rollouts still generating")):
        ax.set_xlabel("completion position")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
