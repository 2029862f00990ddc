"""The `clp-jax` entry point: one error line and exit 2, tracebacks with --debug wherever it is given."""

import argparse
import os
import subprocess
import sys
import warnings

import pytest

from clp_jax.cli.main import COMMANDS, build_parser, main
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


def test_the_parser_for_help_imports_no_heavy_library():
    code = ("import sys; import clp_jax.cli.main as m; m.build_parser(); "
            "print(sorted(k for k in ('jax', 'transformers', 'nltk', 'torch') if k in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_module_has_the_help_line_of_COMMANDS(command):
    subparsers = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    assert {a.dest: a.help for a in subparsers._choices_actions} == COMMANDS


@pytest.mark.parametrize("jax_first", [True, False], ids=["jax-imported", "jax-not-yet-imported"])
def test_no_libtpu_errors_on_a_host_without_a_tpu(jax_first):
    from clp_jax.chips import host_has_tpu, libtpu_installed
    from clp_jax.cli.main import _jax_plugins_installed

    if not libtpu_installed() or host_has_tpu() or _jax_plugins_installed():
        pytest.skip("needs libtpu and no other PJRT plugin installed on a host without a TPU")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # conftest sets it for the tests
    # libtpu logs its errors once past its lock file, which another JAX process may hold (or this host refuse).
    env.update(PYTHONPATH=os.pathsep.join(sys.path), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    code = ("from clp_jax.cli.main import keep_jax_off_libtpu; keep_jax_off_libtpu('eval'); import jax; "
            "print(jax.devices()[0].platform)")
    if jax_first:
        code = "import jax; " + code
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "cpu", run.stderr
    assert "TPU" not in run.stderr, run.stderr


def test_a_preempted_pipeline_exits_75_with_one_line(monkeypatch, capsys):
    """A study or demo whose Trainer run was preempted raises Preempted: exit 75 (resume by rerunning), not 2."""
    from clp_jax.cli import train_cmd
    from clp_jax.errors import Preempted, stopped_run_error

    err = stopped_run_error("runs/x", {"status": "preempted", "step": 7})
    assert isinstance(err, Preempted) and "stopped at step 7 (preempted)" in str(err)
    assert not isinstance(stopped_run_error("runs/x", {"status": "nonfinite", "step": 7}), Preempted)

    def preempted(args):
        raise err

    monkeypatch.setattr(train_cmd, "run_trainer", preempted)
    assert main(["train", "--run-dir", "runs/x"]) == 75
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["clp-jax train: preempted: runs/x: training stopped at step 7 (preempted); rerun the same "
                     "command to resume it (exit 75)"]


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cpu,tpu", True), ("tpu", False), ("cuda", False)])
def test_runs_on_cpu_follows_jax_platforms(monkeypatch, platforms, expected):
    from clp_jax.cli import main as cli_main

    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert cli_main.runs_on_cpu() is expected


def test_runs_on_cpu_without_jax_platforms_asks_for_plugins_and_tpus(monkeypatch):
    from clp_jax import chips
    from clp_jax.cli import main as cli_main

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    for plugins, tpu, expected in [(False, False, True), (True, False, False), (False, True, False)]:
        monkeypatch.setattr(cli_main, "_jax_plugins_installed", lambda plugins=plugins: plugins)
        monkeypatch.setattr(chips, "host_has_tpu", lambda tpu=tpu: tpu)
        assert cli_main.runs_on_cpu() is expected


@pytest.mark.parametrize("command, called", [("train", True), ("sft", True), ("eval", False)])
def test_training_commands_on_a_cpu_keep_freed_memory(monkeypatch, tmp_path, command, called):
    from clp_jax import host_memory

    calls = []
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(command) or False)
    argv = ["--config", str(tmp_path / "missing.yaml")] if command != "eval" else \
        ["--model", str(tmp_path / "missing"), "--data", str(tmp_path / "x.txt")]
    assert main([command, *argv]) == 2
    assert calls == ([command] if called else [])
