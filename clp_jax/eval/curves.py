"""The CLP-Transfer headline metric and the plots: steps each run needs to reach another's loss, held-out curves
per initialization and step-0 bits per byte against reference models."""

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


def steps_to_reach_table(curves: Mapping[str, Curve], best: str) -> dict[str, list[dict]]:
    """The paper's metric both ways, per other run and eval step s of ``best``: the first step at which the run
    reaches best's loss at s (``run_steps``) and at which best reaches the run's loss at s (``best_steps``);
    None where the curve never gets there."""
    table = {}
    for name, curve in curves.items():
        if name == best:
            continue
        own = dict(curve)
        table[name] = [{"step": step, "best_loss": loss, "run_steps": steps_to_reach(curve, loss),
                        "loss": own.get(step),
                        "best_steps": None if step not in own else steps_to_reach(curves[best], own[step])}
                       for step, loss in curves[best]]
    return table


def plot_eval_curves(curves: Mapping[str, Curve], path: str, title: str, ylabel: str = "held-out loss (nats/token)",
                     references: Mapping[str, float] | None = None) -> None:
    """One line per run against step; ``references`` (label -> value) as dashed horizontal lines."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker=".", label=name)
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color="k", alpha=0.6, linestyle=("--", ":", "-.")[i % 3], linewidth=1, label=label)
    ax.set_xlabel("continued-pretraining step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_value_bars(values: Mapping[str, float], path: str, title: str, xlabel: str,
                    references: Mapping[str, float] | None = None) -> None:
    """Horizontal bars (one per run, in the given order, labelled) with ``references`` as dashed vertical lines."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(6.5, 0.8 + 0.35 * max(len(names), 1)))
    bars = ax.barh(names, [values[n] for n in names], color=["tab:green" if n.startswith("clp") else "tab:gray"
                                                              for n in names])
    for bar, n in zip(bars, names):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {values[n]:.3f}", va="center", fontsize=8)
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axvline(value, color=("tab:red", "tab:blue", "tab:purple")[i % 3], linestyle="--", linewidth=1.2,
                   label=f"{label} ({value:.3f})")
    if references:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    _save(fig, path)


def _save(fig: object, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
