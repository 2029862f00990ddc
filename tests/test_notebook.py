"""The Colab notebook's code cells run top to bottom on CPU: `clp-jax demo --quick` on tiny stand-in inputs."""

import json
import os

from conftest import DEMO_TINY

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "clp_jax_colab_tpu.ipynb")


def test_notebook_code_cells_run(tmp_path, monkeypatch, capsys, demo_inputs):
    cells = json.load(open(NOTEBOOK))["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert len(code) >= 3 and not any(line.lstrip().startswith(("!", "%")) for c in code for line in c.splitlines())
    source, text = demo_inputs
    monkeypatch.setenv("CLP_JAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("CLP_JAX_NOTEBOOK_OUT", str(tmp_path / "demo"))
    monkeypatch.setenv("CLP_JAX_NOTEBOOK_SOURCE", str(source))
    monkeypatch.setenv("CLP_JAX_NOTEBOOK_TEXT", str(text))
    monkeypatch.setenv("CLP_JAX_NOTEBOOK_OVERRIDES", " ".join(DEMO_TINY + ["strategies=[clp,from-scratch]",
                                                                           "compare=[from-scratch]"]))
    namespace = {}
    for source_code in code:
        exec(compile(source_code, NOTEBOOK, "exec"), namespace)
    out = capsys.readouterr().out
    assert "device(s)" in out and "from-scratch" in out and "final held-out loss" in out
    assert (tmp_path / "demo" / "report.md").exists() and (tmp_path / "demo" / "eval_curves.png").exists()
