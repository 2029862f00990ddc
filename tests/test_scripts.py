"""Every script under scripts/ explains itself (`--help`, a child process); bench_train runs in this process."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import pytest

from clp_jax import models
from clp_jax.hf.reader import read_config
from clp_jax.models.config import TransformerConfig

SCRIPTS = sorted(p.name for p in (pathlib.Path(__file__).parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_runs(script):
    path = pathlib.Path(__file__).parents[1] / "scripts" / script
    done = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def bench_train_main(monkeypatch, *args: str) -> None:
    """scripts/bench_train.py's main in this process (its imports and compiles are shared with the suite)."""
    path = pathlib.Path(__file__).parents[1] / "scripts" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    module.main()


def run_bench_train(monkeypatch, capsys, *args: str) -> dict:
    bench_train_main(monkeypatch, *args, "--steps", "1", "--rounds", "1")
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_train_cpu_comparison_runs_on_tiny_shapes(tmp_path, monkeypatch, capsys):
    out = run_bench_train(monkeypatch, capsys, "--layers", "1", "--d-model", "32", "--heads", "2", "--vocab", "64",
                          "--seq-len", "16", "--batch", "2", "--profile", str(tmp_path))
    cfg = TransformerConfig(arch="gpt2", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                            head_dim=16, intermediate_size=128, norm="layernorm", norm_eps=1e-5,
                            activation="gelu_tanh", gated_mlp=False, position="learned", max_position_embeddings=16,
                            qkv_bias=True, out_bias=True, mlp_bias=True)
    # Tied GPT-2, 1 layer: the 6 * N * tokens term plus 12 * L * d_model * seq * tokens, counted from the weights.
    n = sum(x.size for x in jax.tree.leaves(models.init_params(cfg, jax.random.key(0)))) - 16 * 32
    assert out["step_gflop"] == pytest.approx((6 * n * 32 + 12 * 32 * 16 * 32) / 1e9, abs=1e-4)
    assert out["tokens_per_s"] > 0 and out["pytorch_tokens_per_s"] > 0
    assert out["floor_fraction"] == pytest.approx(out["tokens_per_s"] / out["matmul_floor_tokens_per_s"], rel=1e-2)
    assert isinstance(out["page_faults_per_step"], int) and out["page_faults_per_step"] >= 0
    assert 1 <= out["warm_rounds"] <= (6 if out["malloc_kept"] else 1)
    # MFU's peak is the fastest rate the run saw, so no product timed alone beats it.
    assert out["peak_gflops"] >= max(out["matmul_gflops_by_kind"].values()) - 0.1
    # The trace's thunks are told apart: the dots, and the attention, loss and optimizer elementwise work.
    assert {"matmuls", "attention", "norms+residual", "loss", "optimizer+other"} <= set(out["profile_ms"])


def test_bench_train_gpu_path_runs_tiny_on_cpu(monkeypatch, capsys):
    out = run_bench_train(monkeypatch, capsys, "--backend", "gpu", "--tiny", "--attention", "xla", "cudnn")
    cfg = read_config(str(pathlib.Path(__file__).parents[1] / "configs" / "arch" / "llama-3.2-1b"))
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.vocab_size) == (16, 2048, 8, 128256)
    tiny = cfg.replace(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
                       vocab_size=256)
    assert out["params"] == sum(x.size for x in jax.tree.leaves(models.init_params(tiny, jax.random.key(0))))
    xla = out["attention"]["xla"]
    assert xla["tokens_per_s"] == pytest.approx(out["batch"] * out["seq_len"] / xla["step_s"], rel=2e-2)
    assert xla["mfu"] is None  # a CPU has no vendor peak
    assert "runs on GPUs" in out["attention"]["cudnn"]["error"]  # reported, and the other implementation still ran


def test_bench_train_gpu_backend_without_gpu_says_so(monkeypatch):
    with pytest.raises(SystemExit) as exc:
        bench_train_main(monkeypatch, "--backend", "gpu")
    assert exc.value.code != 0 and "JAX sees no GPU" in str(exc.value.code)
