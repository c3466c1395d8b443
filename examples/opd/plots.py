"""PNG plots of a run's metrics: held-out accuracy against OPD wall time, and drift along rollouts."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training machine
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def accuracy_vs_time(
    runs: dict[str, list[dict]],
    path: Path,
    *,
    target: float | None = None,
    teacher: float | None = None,
    x: str = "wall_time",
    ylabel: str = "held-out accuracy (greedy)",
):
    """One line per method: held-out accuracy at each evaluation against cumulative OPD seconds
    (x="wall_time") or tokens generated (x="tokens_generated_total"), with the target and the
    teacher's accuracy on the same problems as horizontal lines. Returns the (closed) figure."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, metrics in runs.items():
        points = [(m.get(x, 0.0), m["accuracy"]) for m in metrics if "accuracy" in m]
        ax.plot(*zip(*points), marker="o", markersize=3, label=method)
    if teacher is not None:
        ax.axhline(teacher, color="black", linestyle="--", linewidth=1, label=f"teacher {teacher:.2f}")
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.2f}")
    ax.set_xlabel(
        {
            "wall_time": "OPD wall time (s, evaluation excluded)",
            "tokens_generated_total": "student tokens generated",
        }.get(x, x)
    )
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


# Rows that ended on their own (EOS or the length cap) vs rows Prune-OPD stopped.
GROUP_STYLES = {"_finished": ("-", "ended normally (EOS / length cap)"), "_pruned": ("--", "stopped by Prune-OPD")}


def drift_profiles(profiles: list[dict], path: Path, *, title: str = "", k: int | None = None, max_curves: int = 4):
    """Per completion position: mean top-k overlap, mean reward multiplier and the fraction of
    rollouts still generating, for a few steps spread over training (early = dark, late = light);
    overlap and multiplier drawn apart for rows that ended normally (solid) and pruned rows (dashed).
    Returns the (closed) figure, or None without profiles."""
    if not profiles:
        return None
    picks = (
        profiles
        if len(profiles) <= max_curves
        else [profiles[round(i * (len(profiles) - 1) / (max_curves - 1))] for i in range(max_curves)]
    )
    k_text = f"top-{k}" if k is not None else "top-k"
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharex=True)
    used_styles = set()
    step_handles = []
    for i, prof in enumerate(picks):
        shade = plt.cm.viridis(0.15 + 0.7 * i / max(1, len(picks) - 1))
        step_handles.append(Line2D([], [], color=shade, label=f"step {prof['step']}"))
        for ax, key in zip(axes[:2], ("overlap", "multiplier")):
            # Profiles written before the split have only the all-rows mean: drawn solid.
            groups = [g for g in GROUP_STYLES if key + g in prof] or [""]
            for group in groups:
                values = [math.nan if v is None else v for v in prof[key + group]]
                if all(math.isnan(v) for v in values):
                    continue
                style = GROUP_STYLES.get(group, ("-", None))[0]
                used_styles.add(group)
                ax.plot(range(len(values)), values, color=shade, linestyle=style)
        axes[2].plot(range(len(prof["alive"])), prof["alive"], color=shade)
    for ax, name, ylabel in zip(
        axes,
        (f"{k_text} overlap (student vs teacher)", "reward multiplier", "rollouts still generating"),
        (f"mean {k_text} overlap", "mean multiplier (w_base + weight)", "fraction of rollouts"),
    ):
        ax.set_xlabel("completion position")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    style_handles = [
        Line2D([], [], color="grey", linestyle=GROUP_STYLES[g][0], label=GROUP_STYLES[g][1])
        for g in GROUP_STYLES
        if g in used_styles
    ]
    # Below the panels, where it hides no curve.
    fig.legend(
        handles=step_handles + style_handles,
        fontsize=8,
        loc="lower center",
        ncol=len(step_handles) + len(style_handles),
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
