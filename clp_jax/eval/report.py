"""The CLP-Transfer headline metric and its plots: steps each initialization needs to reach a target loss."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Curve = Sequence[tuple[int, float]]  # (step, eval loss), steps ascending


def steps_to_reach(curve: Curve, target: float) -> int | None:
    """The first step whose eval loss is <= target, or None if the curve never gets there."""
    for step, loss in curve:
        if loss <= target:
            return step
    return None


def steps_fraction(curves: Mapping[str, Curve], baseline: str = "from-scratch") -> dict[str, float | None]:
    """Fraction of the baseline's steps each run needs to reach the baseline's final loss (the paper's metric)."""
    base = curves[baseline]
    target, total = base[-1][1], base[-1][0]
    return {name: (None if (s := steps_to_reach(c, target)) is None else s / total) for name, c in curves.items()}


def plot_eval_curves(curves: Mapping[str, Curve], path: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=name)
    ax.set_xlabel("continued-pretraining step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_steps_fraction(fractions: Mapping[str, float | None], path: str, baseline: str = "from-scratch") -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    names = list(fractions)
    values = [fractions[n] if fractions[n] is not None else 0.0 for n in names]
    bars = ax.barh(names, values, color=["tab:green" if n.startswith("clp") else "tab:gray" for n in names])
    for bar, n in zip(bars, names):
        label = "not reached" if fractions[n] is None else f"{fractions[n]:.0%}"
        ax.text(bar.get_width() + 0.01, bar.get_y() + bar.get_height() / 2, label, va="center", fontsize=9)
    ax.set_xlim(0, 1.15)
    ax.set_xlabel(f"fraction of {baseline}'s steps needed to reach its final held-out loss")
    ax.invert_yaxis()
    _save(fig, path)


def _save(fig: object, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
