"""`clp-jax demo` on tiny stand-ins: demo.json's schema and values against `clp-jax eval` and the curves,
report.md's sections, and reruns that reuse unchanged stages and redo a changed one."""

import json
import math

import pytest
from conftest import DEMO_TINY

from clp_jax.cli.main import main
from clp_jax.eval.curves import steps_to_reach
from clp_jax.transfer.validate import DEFAULT_STRATEGY

STRATEGIES = ["fvt", "clp", "mean", "from-scratch", "random"]  # DEMO_TINY's


def demo(inputs, out, capsys, *extra):
    source, text = inputs
    code = main(["demo", "--out", str(out), "--source", str(source), "--text", str(text), *DEMO_TINY, *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def clp_eval(model, data, capsys):
    assert main(["eval", "--model", str(model), "--data", str(data), "--seq-len", "32"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_demo_results_match_eval_and_curves_and_reruns_reuse(demo_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    summary, _ = demo(demo_inputs, out, capsys)
    source_dir, text = demo_inputs
    result = json.loads((out / "demo.json").read_text())
    assert {"source", "step0", "curves", "minutes"} <= set(result) and result["minutes"] > 0
    assert set(result["source"]) == {"name", "params"} and result["source"]["name"] == "source"
    assert result["source"]["params"] > 0
    held = out / "data" / "held_out.txt"
    assert held.read_text(encoding="utf-8").splitlines() == text.read_text().splitlines()[-20:]
    assert set(result["step0"]) == set(STRATEGIES)
    for name, step0 in result["step0"].items():  # step 0 = an independent `clp-jax eval` of the written dir
        assert set(step0) == {"loss", "bits_per_byte"}
        want = clp_eval(out / "study" / "strategies" / name / "model", held, capsys)
        assert step0["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert step0["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-6)
    source = clp_eval(source_dir, held, capsys)
    assert result["references"]["source"]["bpb"] == pytest.approx(source["bits_per_byte"], rel=1e-6)
    assert math.isfinite(result["references"]["helper"]["bpb"])

    best0 = min(result["step0"], key=lambda n: result["step0"][n]["bits_per_byte"])
    assert result["best_step0"] == best0
    curves = result["curves"]
    assert set(curves) == {best0, DEFAULT_STRATEGY, "clp", "from-scratch", "mean"}
    for name, curve in curves.items():
        assert [p[0] for p in curve] == [0, 2, 4]
        assert curve[0][1] == pytest.approx(result["step0"][name]["loss"], rel=1e-5)
        assert curve[0][2] == pytest.approx(result["step0"][name]["bits_per_byte"], rel=1e-5)
    verdict = result["default"]
    assert verdict["strategy"] == DEFAULT_STRATEGY == summary["default"]["strategy"]
    assert set(verdict["beats"]) == {"clp", "from-scratch", "mean"} - {DEFAULT_STRATEGY}
    for name, v in verdict["beats"].items():  # against the step-0 table and the curves
        bpb0 = {n: r["bits_per_byte"] for n, r in result["step0"].items()}
        assert v["step0"] == (bpb0[DEFAULT_STRATEGY] < bpb0[name])
        assert v["final"] == (curves[DEFAULT_STRATEGY][-1][2] < curves[name][-1][2])
    best = result["best"]
    assert best == min(curves, key=lambda n: curves[n][-1][2]) == summary["best"]
    table = result["steps_to_reach"]
    assert set(table) == set(curves) - {best}
    for name, rows in table.items():  # against the curves, both ways
        assert [r["step"] for r in rows] == [p[0] for p in curves[best]]
        for row, (_, loss, _), (_, own, _) in zip(rows, curves[best], curves[name]):
            assert row["best_loss"] == loss and row["loss"] == own
            first = [s for s, x, _ in curves[name] if x <= loss]
            assert row["run_steps"] == (first[0] if first else None)
            assert row["best_steps"] == steps_to_reach([(s, x) for s, x, _ in curves[best]], own)
    assert table and any(r["run_steps"] is None or r["best_steps"] is not None for rows in table.values()
                         for r in rows)
    scratch_final = curves["from-scratch"][-1][1]
    assert result["steps_to_from_scratch_final"] == {
        n: next((s for s, x, _ in c if x <= scratch_final), None) for n, c in curves.items()}
    assert result["steps_to_from_scratch_final"]["from-scratch"] <= 4
    sft = result["sft"]
    assert set(sft["languages"]) == {"en", "de"} and sft["steps"] == 2
    assert all(math.isfinite(v[when]["loss"]) for v in sft["languages"].values() for when in ("before", "after"))
    report = (out / "report.md").read_text()
    assert f"The default strategy (`{DEFAULT_STRATEGY}`) against each baseline" in report
    for section in ("## Step 0", "## Continued pretraining", "## Steps to reach", "## Multilingual SFT round",
                    "## Time"):
        assert section in report
    assert "not reached" in report or all(r["run_steps"] is not None for rows in table.values() for r in rows)
    assert (out / "step0_bpb.png").stat().st_size and (out / "eval_curves.png").stat().st_size

    helper_config = out / "helper" / "run" / "hf" / "final" / "config.json"
    mtime = helper_config.stat().st_mtime_ns
    again, err = demo(demo_inputs, out, capsys)  # unchanged: every stage reused
    for part in ("tokenizer", "helper pretraining", "SFT round"):
        assert f"{part}: unchanged, reused" in err
    assert "redoing" not in err and ": transferring (" not in err, err
    assert err.count("training: unchanged, reused") == len(curves) + 1  # and "helper pretraining"
    assert helper_config.stat().st_mtime_ns == mtime
    rerun = json.loads((out / "demo.json").read_text())
    assert rerun["curves"] == curves and rerun["stages"] == result["stages"]  # timed by the run that made them
    assert rerun["minutes"] == result["minutes"] and rerun["this_run_minutes"] < result["minutes"]

    _, err = demo(demo_inputs, out, capsys, "sft.steps=3")  # only the SFT round changed
    assert "SFT round: config changed (steps), redoing" in err and "helper pretraining: unchanged" in err
    third = json.loads((out / "demo.json").read_text())
    assert third["sft"]["steps"] == 3 and third["stages"]["helper"] == result["stages"]["helper"]
