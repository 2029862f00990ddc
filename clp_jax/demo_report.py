"""The demo's results: demo.json, report.md and the plots, from the study's results and the SFT summary."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from clp_jax.config import config_to_dict
from clp_jax.eval.curves import plot_eval_curves, plot_value_bars, steps_to_reach, steps_to_reach_table
from clp_jax.files import atomic_open, write_json
from clp_jax.transfer.study_report import cell
from clp_jax.transfer.validate import DEFAULT_STRATEGY


def step0_table(results: dict) -> dict[str, dict[str, float]]:
    """{strategy: {loss, bits_per_byte}} of a step-0 study, best first."""
    rows = {r["name"]: r["step0"] for r in results["strategies"]}
    return {name: {"loss": rows[name]["loss"], "bits_per_byte": rows[name]["bpb"]} for name in results["ranking"]}


def curves_table(results: dict) -> dict[str, list[list[float]]]:
    """{strategy: [[step, loss, bits_per_byte], ...]} of a trained study, best first."""
    rows = {r["name"]: r["curve"] for r in results["strategies"]}
    return {name: [[p["step"], p["loss"], p["bpb"]] for p in rows[name]] for name in results["ranking"]}


def default_verdict(step0: dict, curves: dict, default: str,
                    baselines: Sequence[str] = ("clp", "mean", "from-scratch")) -> dict[str, dict[str, bool]]:
    """For each baseline trained beside ``default``: whether ``default`` has lower bits per byte at step 0 and at
    the last eval step."""
    if default not in curves:
        return {}
    return {name: {"step0": step0[default]["bits_per_byte"] < step0[name]["bits_per_byte"],
                   "final": curves[default][-1][2] < curves[name][-1][2]}
            for name in baselines if name in curves and name != default}


def _verdict_lines(verdict: dict[str, dict[str, bool]], default: str, steps: int) -> list[str]:
    if not verdict:
        return [f"The default strategy (`{default}`) was not trained in this run."]
    word = {True: "lower", False: "**not lower**"}
    return [f"The default strategy (`{default}`) against each baseline, held-out bits per byte:", "",
            f"| baseline | at step 0 | after {steps} steps |", "| --- | --- | --- |",
            *(f"| {name} | {word[v['step0']]} | {word[v['final']]} |" for name, v in verdict.items())]


def _reached(step: int | None) -> str:
    return "not reached" if step is None else str(step)


def reach_lines(table: Mapping[str, Sequence[dict]], best: str) -> list[str]:
    """The two Markdown tables of the steps-to-reach metric: each run against best's losses, and best against
    each run's."""
    names = list(table)
    steps = [row["step"] for row in next(iter(table.values()), [])]
    head = "| step s | " + " | ".join(names) + " |"
    rule = "|" + " --- |" * (len(names) + 1)
    lines = [f"Steps each run needs to reach **{best}**'s held-out loss at step s:", "", head.replace(
        "step s |", f"step s ({best}'s loss) |"), rule]
    for i, s in enumerate(steps):
        loss = table[names[0]][i]["best_loss"]
        lines.append(f"| {s} ({loss:.4f}) | " + " | ".join(_reached(table[n][i]["run_steps"]) for n in names) + " |")
    lines += ["", f"Steps **{best}** needs to reach each run's held-out loss at step s:", "", head, rule]
    for i, s in enumerate(steps):
        lines.append(f"| {s} | " + " | ".join(_reached(table[n][i]["best_steps"]) for n in names) + " |")
    return lines


def _markdown(cfg: Any, summary: dict, results0: dict, helper: dict) -> list[str]:
    lang, source, refs = cfg.language, summary["source"], summary["references"]
    curves, best, t = summary["curves"], summary["best"], cfg.train
    lines = [f"# clp-jax demo: {source['name']} -> {lang}", "",
             f"Source: `{source['name']}` ({source['params']:,} parameters). Target tokenizer: byte-level BPE of "
             f"{summary['tokenizer']['vocab_size']:,} tokens and a helper GPT-2 ({helper['layers']} layers, width "
             f"{helper['width']}, {helper['params']:,} parameters, {helper['steps']} steps), both trained here on "
             f"{summary['held_out']['train_documents']:,} {lang} documents. Held out: the last "
             f"{summary['held_out']['documents']} documents, whole, truncated to "
             f"{results0['held_out']['seq_len']} tokens (`clp-jax eval`). Bits per byte compare across tokenizers.",
             "", "## Step 0: every strategy, before any training", "",
             "| rank | strategy | loss | bits per byte |", "| --- | --- | --- | --- |"]
    lines += [f"| {i} | {name} | {cell(v['loss'])} | {cell(v['bits_per_byte'])} |"
              for i, (name, v) in enumerate(summary["step0"].items(), 1)]
    lines += ["", "| reference (own tokenizer) | loss | bits per byte |", "| --- | --- | --- |"]
    lines += [f"| {label} | {cell(r['loss'])} | {cell(r['bpb'])} |" for label, r in
              ((f"{source['name']} (source)", refs["source"]), ("helper", refs["helper"]))]
    lines += ["", "![step-0 bits per byte](step0_bpb.png)", "",
              f"## Continued pretraining: {', '.join(curves)}", "",
              f"{t.steps} steps each of {t.batch_size} x {t.seq_len} tokens, learning rate {t.learning_rate} "
              f"({t.schedule}), the same rows in the same order; held-out eval every {t.eval_every} steps from "
              "step 0.", "", "| strategy | step-0 loss | final loss | final bits per byte |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {cell(c[0][1])} | {cell(c[-1][1])} | {cell(c[-1][2])} |" for name, c in curves.items()]
    lines += ["", *_verdict_lines(summary["default"]["beats"], summary["default"]["strategy"], t.steps)]
    lines += ["", "![held-out bits per byte](eval_curves.png)", "",
              "## Steps to reach (the paper's metric)", "",
              f"Measured at the eval steps (every {t.eval_every}); \"not reached\": not within {t.steps} steps.", ""]
    lines += reach_lines(summary["steps_to_reach"], best)
    scratch = summary.get("steps_to_from_scratch_final")
    if scratch:
        target = curves["from-scratch"][-1][1]
        lines += ["", f"Steps each run needs to reach from-scratch's final loss ({target:.4f} at step {t.steps}): "
                  + ", ".join(f"{n} {_reached(s)}" for n, s in scratch.items()) + "."]
    sft = summary["sft"]
    lines += ["", f"## Multilingual SFT round on {best}", "",
              f"Math word problems: {cfg.sft.english} English + {cfg.sft.target} {lang} training examples, "
              f"{sft['steps']} steps, plain `prompt + \"\\n\"` formatting (the tokenizer has no chat template); "
              f"held-out response loss on {cfg.sft.eval_examples} examples per language:", "",
              "| language | loss before | loss after | bits per byte before | bits per byte after |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {lg} | {cell(v['before']['loss'])} | {cell(v['after']['loss'])} | {cell(v['before']['bpb'])} | "
              f"{cell(v['after']['bpb'])} |" for lg, v in sft["languages"].items()]
    lines += ["", "## Time", "", "| stage | seconds |", "| --- | --- |"]
    labels = {"helper": "helper pretraining", "step0": "step-0 study", "train": "continued pretraining",
              "sft": "SFT round"}
    lines += [f"| {labels.get(name, name)} | {s:.0f} |" for name, s in summary["stages"].items()]
    lines += ["", f"Total: {summary['minutes']:.1f} min, each stage timed by the run that made it (this run: "
              f"{summary['this_run_minutes']:.1f} min; a reused stage takes seconds)."]
    return lines


def write_report(cfg: Any, source: dict, helper: dict, results0: dict, results: dict, sft: dict,
                 stages: dict[str, float], this_run_minutes: float) -> dict:
    """demo.json, report.md, step0_bpb.png and eval_curves.png in ``cfg.out``; returns the CLI's summary.

    ``stages``: seconds per stage as the run that made it measured them (``minutes`` is their sum).
    """
    out = cfg.out
    curves = curves_table(results)
    best = results["ranking"][0]
    refs = results0["references"]
    summary = {"source": source, "step0": step0_table(results0), "curves": curves,
               "minutes": round(sum(stages.values()) / 60, 2), "this_run_minutes": round(this_run_minutes, 2),
               "best": best, "best_step0": results0["ranking"][0],
               "references": {k: {"loss": v["loss"], "bpb": v["bpb"]} for k, v in refs.items()},
               "steps_to_reach": steps_to_reach_table({n: [(p[0], p[1]) for p in c] for n, c in curves.items()}, best),
               "tokenizer": {"vocab_size": helper.get("vocab_size")}, "helper": helper, "sft": sft,
               "stages": stages, "held_out": {"documents": results0["held_out"]["documents"],
                                              "train_documents": helper.get("train_documents"),
                                              "seq_len": results0["held_out"]["seq_len"]},
               "inputs": {"source": cfg.source, "text": cfg.text}, "config": config_to_dict(cfg)}
    summary["default"] = {"strategy": DEFAULT_STRATEGY,
                          "beats": default_verdict(summary["step0"], curves, DEFAULT_STRATEGY)}
    if "from-scratch" in curves:
        target = curves["from-scratch"][-1][1]
        summary["steps_to_from_scratch_final"] = {n: steps_to_reach([(p[0], p[1]) for p in c], target)
                                                  for n, c in curves.items()}
    ref_lines = {f"{source['name']} (own tokenizer)": refs["source"]["bpb"], "helper": refs["helper"]["bpb"]}
    plot_value_bars({k: v["bits_per_byte"] for k, v in summary["step0"].items()}, os.path.join(out, "step0_bpb.png"),
                    f"held-out {cfg.language} bits per byte at step 0", "bits per byte (lower is better)",
                    references=ref_lines)
    plot_eval_curves({n: [(p[0], p[2]) for p in c] for n, c in curves.items()}, os.path.join(out, "eval_curves.png"),
                     f"{source['name']} -> {cfg.language}: held-out bits per byte", ylabel="bits per byte",
                     references=ref_lines)
    with atomic_open(os.path.join(out, "report.md")) as f:
        f.write("\n".join(_markdown(cfg, summary, results0, helper)) + "\n")
    write_json(os.path.join(out, "demo.json"), summary)
    final = {n: c[-1][1] for n, c in curves.items()}
    return {"out": out, "best": best, "step0_best": summary["best_step0"], "default": summary["default"],
            "final_loss": final,
            "minutes": summary["minutes"], "this_run_minutes": summary["this_run_minutes"],
            "report": os.path.join(out, "report.md"), "demo": os.path.join(out, "demo.json")}
