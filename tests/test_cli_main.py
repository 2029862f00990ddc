"""The `clp-jax` entry point: one error line and exit 2, tracebacks with --debug wherever it is given."""

import os
import subprocess
import sys
import warnings

import pytest

from clp_jax.cli.main import main
from clp_jax.errors import ClpError

# scipy (imported by the CLI's modules) reads sys.modules["torch"] once imported, so it is imported first;
# transformers then finds no torch.
WITHOUT_TORCH = """
import sys
import scipy.stats
sys.modules["torch"] = None
from clp_jax.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_debug_before_or_after_the_command_shows_the_traceback(tmp_path, capsys):
    argv = ["eval", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "x.txt")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"clp-jax eval: error: {tmp_path / 'missing'}: model directory not found"
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(ClpError, match="model directory not found"):
            main(debug_argv)


def test_no_pytorch_advisory_from_transformers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "eval", "--model", str(tmp_path / "missing"),
                          "--data", str(tmp_path / "x.txt")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [f"clp-jax eval: error: {tmp_path / 'missing'}: model directory "
                                               "not found"], run.stderr


def test_dropout_in_config_json_is_one_warning_line_when_training(tmp_path):
    from train_setup import make_train_config

    from clp_jax.errors import ClpWarning
    from clp_jax.hf.reader import read_config

    config = make_train_config(tmp_path)  # a GPT-2 with transformers' default dropout 0.1
    with pytest.warns(ClpWarning, match=r"config.json: sets dropout \(attn_pdrop=0.1, embd_pdrop=0.1, "
                                        r"resid_pdrop=0.1\); clp-jax implements no dropout and ignores it"):
        read_config(str(tmp_path / "model"), warn_dropout=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_config(str(tmp_path / "model"))  # evaluation and transfer do not need to hear it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    code = "import sys; from clp_jax.cli.main import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", code, "train", "--config", config, "data.seq_len=128"], env=env,
                         capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 2, run.stderr
    assert lines[0].startswith("clp-jax train: warning: ") and "training runs without dropout" in lines[0]
    assert lines[1].startswith("clp-jax train: error: ") and "learned positions" in lines[1]
