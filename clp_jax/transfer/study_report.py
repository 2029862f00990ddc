"""The results of `clp-jax study transfer`: the mean-row diagnostic, the ranking, the Markdown table,
results.json/.md and the plots."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from clp_jax.eval.curves import plot_eval_curves, plot_value_bars
from clp_jax.files import atomic_open, write_json


def mean_cosine_to_shared_mean(target: np.ndarray, source: np.ndarray, target_ids: np.ndarray,
                               source_ids: np.ndarray) -> float | None:
    """Mean cosine of the computed (non-shared) target rows with the mean of the shared source rows.

    Near 1 means the strategy gave nearly every new token the row `mean` gives it.
    """
    computed = np.setdiff1d(np.arange(len(target)), target_ids)
    if not computed.size or not len(source_ids):
        return None
    mean = np.asarray(source, np.float64)[source_ids].mean(axis=0)
    rows = np.asarray(target, np.float64)[computed]
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(mean)
    cos = np.divide(rows @ mean, norms, out=np.zeros(len(rows)), where=norms > 0)
    return float(cos.mean())


def _last_point(row: dict) -> dict:
    return row["curve"][-1] if row.get("curve") else {"step": 0, **row["step0"]}


def ranking(rows: Sequence[dict]) -> list[str]:
    """Entry names by their last evaluated bits per byte (the final step when trained), best first; NaN last."""
    def key(row: dict) -> tuple:
        bpb = _last_point(row).get("bpb")
        return (bpb is None or not math.isfinite(bpb), bpb if bpb is not None else 0.0)
    return [r["name"] for r in sorted(rows, key=key)]


def cell(x: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` decimals, None as "-"."""
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def results_table(rows: Sequence[dict], references: dict[str, dict], steps: int) -> str:
    """The ranked Markdown table of the entries, then the reference lines."""
    by_name = {r["name"]: r for r in rows}
    head = "| rank | strategy | step-0 loss | step-0 bpb |"
    head += f" step-{steps} loss | step-{steps} bpb |" if steps else ""
    head += " mean cos to shared mean | ill-conditioned rows |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for i, name in enumerate(ranking(rows), 1):
        r = by_name[name]
        cells = [str(i), name, cell(r["step0"]["loss"]), cell(r["step0"]["bpb"])]
        if steps:
            last = _last_point(r)
            cells += [cell(last.get("loss")), cell(last.get("bpb"))]
        transfer = r["transfer"]
        cells += [cell(transfer["mean_cos_to_shared_mean"], 3), cell(transfer["degenerate_rows"])]
        lines.append("| " + " | ".join(cells) + " |")
    if references:
        lines += ["", "| reference (own tokenizer) | loss | bpb |", "| --- | --- | --- |"]
        lines += [f"| {label} | {cell(ref['loss'])} | {cell(ref['bpb'])} |" for label, ref in references.items()]
    return "\n".join(lines)


def write_results(out: str, rows: list[dict], references: dict[str, dict], *, steps: int, title: str,
                  held_out: dict[str, Any]) -> dict[str, Any]:
    """results.json, results.md and the plots in ``out`` (the table also on stderr); returns results.json's data.

    ``held_out`` describes the held-out text: documents, path, seq_len, from (in words), sha256.
    """
    order = ranking(rows)
    ref_lines = {"source (own tokenizer)" if k == "source" else k: v["bpb"] for k, v in references.items()}
    plots = {"step0_bpb": os.path.join(out, "step0_bpb.png")}
    by_step0 = sorted(rows, key=lambda r: (not math.isfinite(r["step0"]["bpb"]), r["step0"]["bpb"]))
    plot_value_bars({r["name"]: r["step0"]["bpb"] for r in by_step0}, plots["step0_bpb"],
                    f"held-out bits per byte at step 0 ({held_out['documents']} documents)",
                    "bits per byte (lower is better)", references=ref_lines)
    if steps:
        plots["bpb_curves"] = os.path.join(out, "bpb_curves.png")
        plot_eval_curves({r["name"]: [(p["step"], p["bpb"]) for p in r["curve"]] for r in rows}, plots["bpb_curves"],
                         "held-out bits per byte during continued pretraining", ylabel="bits per byte",
                         references=ref_lines)
    table = results_table(rows, references, steps)
    rank_by = f"bits per byte at step {steps}" if steps else "step-0 bits per byte"
    md = [f"# {title}", "",
          f"Held out: {held_out['documents']} documents ({held_out['from']}; copy in "
          f"{os.path.relpath(held_out['path'], out)}), whole documents truncated to {held_out['seq_len']} tokens as "
          f"`clp-jax eval` reads them. Bits per byte compare across tokenizers. Ranked by {rank_by}. Mean cos to "
          "shared mean: the mean cosine of the computed (non-shared) input-embedding rows with the mean of the "
          "shared source rows (1: the `mean` baseline).", "", table, "", "![step-0 bpb](step0_bpb.png)"]
    if steps:
        md += ["", "![bpb curves](bpb_curves.png)"]
    with atomic_open(os.path.join(out, "results.md")) as f:
        f.write("\n".join(md) + "\n")
    print(table, file=sys.stderr, flush=True)
    results = {"title": title, "steps": steps, "rank_by": rank_by, "ranking": order, "held_out": held_out,
               "references": references, "strategies": rows, "plots": plots}
    write_json(os.path.join(out, "results.json"), results)
    return results
