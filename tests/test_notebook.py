"""The Colab notebook's code cells run top to bottom on CPU with a tiny configuration."""

import json
import os

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "clp_jax_colab_tpu.ipynb")


def test_notebook_code_cells_run(tmp_path, monkeypatch, capsys):
    cells = json.load(open(NOTEBOOK))["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert len(code) >= 3 and not any(line.lstrip().startswith(("!", "%")) for c in code for line in c.splitlines())
    monkeypatch.setenv("CLP_JAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("CLP_JAX_NOTEBOOK_OUT", str(tmp_path / "demo"))
    namespace = {}
    for source in code:
        exec(compile(source, NOTEBOOK, "exec"), namespace)
    out = capsys.readouterr().out
    assert "device(s)" in out and "from-scratch" in out and "final held-out loss" in out
    assert (tmp_path / "demo" / "report.md").exists() and (tmp_path / "demo" / "eval_loss.png").exists()
