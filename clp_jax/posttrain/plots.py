"""PNG plots of a CLT study: metric vs N per language, the seen-vs-unseen gap, the transfer matrix."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clp_jax.eval.metrics import aggregate  # noqa: E402


def _grid_rows(rows: Sequence[dict], metric: str, seen: Sequence[str]) -> list[dict]:
    """Rows of cells trained on all seen languages (or on English only, N = 0), not the matrix's extra cells."""
    return [r for r in rows if r.get(metric) is not None and (r["n"] == 0 or r["train_languages"] == "+".join(seen))]


def plot_metric_vs_n(rows: Sequence[dict], metric: str, seen: Sequence[str], unseen: Sequence[str],
                     path: str) -> None:
    """One panel per (model, design, tasks): the metric against N, a line per eval language."""
    groups: dict[tuple, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in _grid_rows(rows, metric, seen):
        key = (r["model"], r["design"], r["tasks"], r["task"])
        groups[key][r["language"]].append((r["n"], r[metric]))
    keys = sorted(groups)
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(5 * max(len(keys), 1), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for lang, points in sorted(groups[key].items()):
            points.sort()
            style = "-o" if lang in seen else "--s" if lang in unseen else ":^"
            ax.plot([p[0] for p in points], [p[1] for p in points], style,
                    label=f"{lang} ({_group(lang, seen, unseen)})")
        model, design, tasks, task = key
        ax.set_title(f"{model} · {design} ({tasks}) · eval {task}", fontsize=9)
        ax.set_xlabel("N examples per seen language")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    _save(fig, path)


def _group(lang: str, seen: Sequence[str], unseen: Sequence[str]) -> str:
    return "seen" if lang in seen else "unseen" if lang in unseen else "English budget"


def gap_series(rows: Sequence[dict], metric: str, seen: Sequence[str],
               unseen: Sequence[str]) -> dict[tuple[str, str, str], dict[int, dict]]:
    """(model, design, eval task) -> N -> {"seen": mean, "unseen": mean} of the metric (None: no language),
    by `eval.metrics.aggregate` over each grid cell's rows."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in _grid_rows(rows, metric, seen):
        cells[(r["model"], r["design"], r["tasks"], r["n"])].append(
            {"language": r["language"], "task": r["task"], metric: r[metric]})
    series: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)
    for (model, design, _, n), results in cells.items():
        means = aggregate(results, seen, unseen)
        for task in means["per_language"]:
            series[(model, design, task)][n] = {g: means[g][task].get(metric) for g in ("seen", "unseen")}
    return dict(series)


def plot_gap(rows: Sequence[dict], metric: str, seen: Sequence[str], unseen: Sequence[str], path: str) -> None:
    """Mean metric over seen and over unseen languages against N (`gap_series`), and their gap."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, by_n in sorted(gap_series(rows, metric, seen, unseen).items()):
        ns = sorted(by_n)
        for group, style in (("seen", "-o"), ("unseen", "--s")):
            ys = [np.nan if by_n[n][group] is None else by_n[n][group] for n in ns]
            ax.plot(ns, ys, style, label=f"{'/'.join(key)} {group}")
    ax.set_xlabel("N examples per seen language")
    ax.set_ylabel(f"mean {metric}")
    ax.set_title("seen vs unseen languages", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_transfer_matrix(rows: Sequence[dict], metric: str, n: int, tasks: str, path: str) -> bool:
    """Heatmap: rows = the one language trained beside English (N examples, all tasks), columns = eval
    language. False if there are no such cells."""
    cells = [r for r in rows if r.get(metric) is not None and r["n"] == n and r["tasks"] == tasks
             and r["train_languages"] and "+" not in r["train_languages"]]
    if not cells:
        return False
    train = sorted({r["train_languages"] for r in cells})
    evals = sorted({r["language"] for r in cells})
    grid = np.full((len(train), len(evals)), np.nan)
    for r in cells:
        values = grid[train.index(r["train_languages"]), evals.index(r["language"])]
        grid[train.index(r["train_languages"]), evals.index(r["language"])] = np.nanmean([values, r[metric]])
    fig, ax = plt.subplots(figsize=(1.2 * len(evals) + 2, 0.9 * len(train) + 1.6))
    im = ax.imshow(grid, cmap="viridis_r" if "loss" in metric or "bpb" in metric else "viridis", aspect="auto")
    ax.set_xticks(range(len(evals)), evals)
    ax.set_yticks(range(len(train)), [f"en+{t}" for t in train])
    for i in range(len(train)):
        for j in range(len(evals)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xlabel("eval language")
    ax.set_ylabel("trained on")
    ax.set_title(f"transfer matrix: {metric} (mean over tasks)", fontsize=10)
    fig.colorbar(im, ax=ax)
    _save(fig, path)
    return True


def _save(fig: Any, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
