"""`clp-jax plan`: the train step compiled ahead of time for a TPU topology (libtpu, no TPU) on this CPU host."""

import json
import math
import pathlib
import re

import pytest

from clp_jax.cli.main import main
from clp_jax.config import load_config
from clp_jax.hf.reader import read_config
from clp_jax.models.config import NUMERICS_FIELDS
from clp_jax.sharding import make_mesh
from clp_jax.train import plan as plan_module
from clp_jax.train.config import ModelSection, TrainConfig, model_config
from clp_jax.train.flops import train_step_flops
from clp_jax.train.optimizer import OptimizerConfig, make_optimizer
from clp_jax.train.plan import CHIPS, bytes_per_device, parse_topology, plan, tpu_devices
from clp_jax.train.state import abstract_state

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"
PAPER_CONFIGS = sorted(CONFIGS.glob("train_*_german_*.yaml"))
TINY = dict(model_type="gpt2", vocab_size=512, n_embd=64, n_layer=1, n_head=4, n_positions=128, bos_token_id=0,
            eos_token_id=0)
# 2M x 1024 tied embeddings: 2.1B parameters, ~24 GiB of float32 weights and Adam moments when replicated.
HUGE = dict(TINY, vocab_size=2**21, n_embd=1024, n_layer=1, n_head=8)


def write_arch(root: pathlib.Path, name: str, arch: dict) -> str:
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(arch))
    return str(model_dir)


def train_yaml(path: pathlib.Path, init: str, mesh: str = "{data: 1, fsdp: -1, tensor: 1}", seq_len: int = 128,
               batch_size: int = 8) -> str:
    path.write_text(f"""run_dir: {path.parent / 'run'}
model: {{init: {init}, dtype: bfloat16}}
data:
  sources: [{{name: de, path: "data/german/*.txt", language: de}}]
  seq_len: {seq_len}
  batch_size: {batch_size}
optimizer: {{learning_rate: 1.0e-4, warmup_steps: 10}}
steps: 100
mesh: {mesh}
""")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_arch(tmp_path_factory.mktemp("arch"), "tiny-gpt2", TINY)


def tiny_param_bytes_fsdp4() -> int:
    """float32 bytes per chip of TINY on (data=1, fsdp=4): by hand from the rules table's semantics.

    vocab rows shard over fsdp (4 | 512), so the token table's embed dim stays whole; every other `embed`
    dim shards over fsdp (4 | 64); heads/mlp would go to `tensor` (size 1); norms and q/k/v/up biases replicate.
    """
    e, v, p, n, h, d, m = 64, 512, 128, 1, 4, 16, 256
    per_layer = (2 * e + 3 * e * h * d / 4 + 3 * h * d + h * d * e / 4 + e / 4
                 + 2 * e + e * m / 4 + m + m * e / 4 + e / 4)
    return int(4 * (v * e / 4 + p * e / 4 + n * per_layer + 2 * e))


def test_plan_tiny_gpt2_on_v5e_2x2_fits(tiny, tmp_path):
    cfg = load_config(TrainConfig, train_yaml(tmp_path / "t.yaml", tiny))
    report = plan(cfg, "v5e:2x2", mfu=0.5)
    assert (report.chips, report.device_kind, report.mesh) == (4, "TPU v5 lite", {"data": 1, "fsdp": 4, "tensor": 1})
    assert report.param_bytes == tiny_param_bytes_fsdp4()
    # Adam's two float32 moments per parameter, sharded like it, plus a few scalars (counts, learning rate).
    assert 2 * report.param_bytes < report.opt_state_bytes <= 2 * report.param_bytes + 64
    assert report.batch_bytes == 3 * 4 * (8 // 4) * 128  # tokens, segment_ids, positions: int32 rows per chip
    assert report.temp_bytes > 0 and report.code_bytes > 0 and report.compile_seconds > 0
    assert report.total_bytes >= report.param_bytes + report.opt_state_bytes + report.temp_bytes
    assert report.fits and report.xla_error is None and report.hbm_bytes == 16 * 2**30
    assert report.headroom_bytes == report.hbm_bytes - report.total_bytes
    tokens = 8 * 128
    assert report.tokens_per_step == tokens
    assert report.flops_per_step == train_step_flops(read_config(tiny), tokens, 128)
    assert 0.8 < report.xla_flops_per_step / report.flops_per_step < 1.5  # XLA's own count of the compiled step
    assert report.tokens_per_s == pytest.approx(0.5 * 4 * 197e12 * tokens / report.flops_per_step)
    # AdamW reads every parameter and both moments of this chip's shard at least once.
    assert report.xla_bytes_accessed_per_chip >= report.param_bytes + report.opt_state_bytes
    assert report.hbm_step_seconds == pytest.approx(report.xla_bytes_accessed_per_chip / 819e9)
    table = report.format_table()
    assert "FITS" in table and "v5e:2x2" in table and "at 819 GB/s" in table


def test_model_config_is_the_init_architecture_with_the_runs_numerics(tiny, tmp_path):
    assert set(ModelSection.model_fields) == {"init", *NUMERICS_FIELDS}
    cfg = load_config(TrainConfig, train_yaml(tmp_path / "t.yaml", tiny))
    cfg.model.remat, cfg.model.logits_chunk, cfg.model.attention = True, 32, "splash"
    model_cfg, stored_dtype = model_config(cfg)
    assert model_cfg.architecture() == read_config(tiny).architecture()
    assert (model_cfg.dtype, model_cfg.param_dtype, model_cfg.remat, model_cfg.logits_chunk, model_cfg.attention) == \
        ("bfloat16", "float32", "full", 32, "splash")  # remat: true is the full policy
    assert stored_dtype == "float32"  # no weight files: the default


def test_bytes_per_device_is_total_over_shards(tiny):
    _, devices = tpu_devices("v5e:2x2")
    cfg = read_config(tiny)
    opt = make_optimizer(OptimizerConfig(total_steps=10))
    replicated = abstract_state(cfg, make_mesh(4, 1, 1, devices=devices), opt)
    assert bytes_per_device(replicated.params) == 4 * cfg.num_params()
    sharded = abstract_state(cfg, make_mesh(1, 4, 1, devices=devices), opt)
    assert bytes_per_device(sharded.params) == tiny_param_bytes_fsdp4()


def test_cli_reports_a_config_that_does_not_fit(tmp_path, capsys):
    huge = write_arch(tmp_path, "huge", HUGE)
    path = train_yaml(tmp_path / "huge.yaml", huge, mesh="{data: 4, fsdp: 1, tensor: 1}", seq_len=16, batch_size=4)
    assert main(["plan", "--config", path, "--topology", "v5e:2x2", "--mfu", "0.3"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["fits"] is False and result["xla_error"]
    assert result["total_bytes"] > result["hbm_bytes"] == 16 * 2**30
    assert result["param_bytes"] == 4 * read_config(huge).num_params()
    assert result["mfu"] == 0.3 and result["chips"] == 4
    assert "does NOT fit" in err and "DOES NOT FIT" in err


@pytest.mark.parametrize("topology", ["v9x:2x2", "v5e", "tpu-v5e-16"])
def test_cli_unknown_topology_is_one_line(tiny, tmp_path, capsys, topology):
    path = train_yaml(tmp_path / "t.yaml", tiny)
    assert main(["plan", "--config", path, "--topology", topology]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown TPU topology" in err[0] and "v5e:16x16" in err[0]


def test_cli_mesh_that_does_not_divide_the_chips(tiny, tmp_path, capsys):
    path = train_yaml(tmp_path / "t.yaml", tiny)
    assert main(["plan", "--config", path, "--topology", "v5e:2x2", "mesh.fsdp=3", "mesh.data=1"]) == 2
    err = capsys.readouterr().err
    assert "v5e:2x2 has 4 chips" in err and "fsdp" in err


def test_cli_without_libtpu_says_what_to_install(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plan_module, "libtpu_installed", lambda: False)
    path = train_yaml(tmp_path / "t.yaml", tiny)
    assert main(["plan", "--config", path, "--topology", "v5e:2x2"]) == 2
    err = capsys.readouterr().err
    assert re.search(r'pip install "jax\[tpu\]==\d+\.\d+\.\d+"', err), err


def test_parse_topology():
    assert parse_topology("v5e:16x16") == ("v5e", (16, 16))
    assert parse_topology("V4:4x4x8") == ("v4", (4, 4, 8))
    assert set(CHIPS) == {"v4", "v5e", "v5p", "v6e"}


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_configs_validate_and_their_mesh_fills_the_topology(path):
    """Each paper config names its topology and architecture in its `clp-jax plan` comment line."""
    cfg = load_config(TrainConfig, path)
    command = re.search(r"clp-jax plan .*--topology (\S+) --init (\S+)", path.read_text())
    assert command, f"{path.name}: no '# clp-jax plan ... --topology T --init DIR' line"
    _, grid = parse_topology(command.group(1))
    mesh = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    assert mesh == math.prod(grid), "one JAX device per chip (v4 as megacore)"
    assert cfg.data.batch_size % (cfg.grad_accum_steps * cfg.mesh.data * cfg.mesh.fsdp) == 0
    arch = read_config(str(CONFIGS.parent / command.group(2)))
    assert arch.num_params() == {"gpt2": 1_557_611_200, "bloom": 7_069_016_064}[arch.arch]  # published sizes
    assert cfg.data.seq_len == {"gpt2": 1024, "bloom": 2048}[arch.arch]


def test_paper_configs_exist():
    names = {p.name for p in PAPER_CONFIGS}
    assert names == {f"train_{m}_german_{g}.yaml" for m in ("gpt2xl", "bloom7b1") for g in ("v4", "v5e", "v5p")}


@pytest.mark.parametrize("message, needed", [
    ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (40.20G) exceeds "
     "available HBM (15.75G).", int(40.20 * 2**30)),
    ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 20.5G of "
     "15.75G hbm. Exceeded hbm capacity by 4.75G.", int(20.5 * 2**30)),
    ("INTERNAL: something else", None),
])
def test_xla_out_of_memory_messages(message, needed):
    assert plan_module._xla_oom_bytes(message) == needed


def test_one_chip_table_serves_mfu_and_plan():
    from clp_jax.chips import chip_for_device_kind

    assert chip_for_device_kind("TPU v5 lite").peak_flops == CHIPS["v5e"].peak_flops == 197e12
    assert chip_for_device_kind("TPU v5").hbm_bytes == CHIPS["v5p"].hbm_bytes
    assert chip_for_device_kind("NVIDIA H200").peak_flops == 989e12 and chip_for_device_kind("cpu") is None


def test_tpu_host_is_recognized_from_the_pci_bus_or_accel_nodes(tmp_path):
    from clp_jax.chips import host_has_tpu

    sysfs, dev = tmp_path / "pci", tmp_path / "dev"
    (sysfs / "0000:00:04.0").mkdir(parents=True)
    (sysfs / "0000:00:04.0" / "vendor").write_text("0x8086\n")
    dev.mkdir()
    assert not host_has_tpu(str(sysfs), str(dev))
    (sysfs / "0000:00:05.0").mkdir()
    (sysfs / "0000:00:05.0" / "vendor").write_text("0x1ae0\n")
    assert host_has_tpu(str(sysfs), str(dev))
    (sysfs / "0000:00:05.0" / "vendor").write_text("0x10de\n")
    (dev / "accel0").write_text("")
    assert host_has_tpu(str(sysfs), str(dev))


# head_dim 128, as Splash tiles it on TPU (TINY's 16 is below a lane).
TINY_128 = dict(TINY, n_embd=256, n_head=2)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v4:2x2x1"])
def test_cli_plans_splash_on_each_tpu_generation(topology, tmp_path, capsys):
    init = write_arch(tmp_path, "tiny128", TINY_128)
    path = train_yaml(tmp_path / "t.yaml", init)
    assert main(["plan", "--config", path, "--topology", topology, "--search", "--attention", "splash",
                 "--remat", "full"]) == 0
    out, err = capsys.readouterr()
    best = json.loads(out.strip().splitlines()[-1])["best"]
    assert (best["attention"], best["remat"], best["fits"]) == ("splash", "full", True)
    cfg = read_config(init)
    # seq_len 128 is one Splash tile: forward, dq and dk/dv matmuls, and the forward again under full remat.
    assert best["kernel_flops_per_step"] == 2 * (2 + 3 + 4 + 2) * 8 * 128 * 128 * 128 * 2 * cfg.num_layers
    assert best["step_flops"] == best["xla_flops_per_step"] + best["kernel_flops_per_step"]
    assert "chosen: model.attention=splash model.remat=full" in err


def test_search_candidates_default_to_autos_attention(tmp_path):
    cfg = load_config(TrainConfig, train_yaml(tmp_path / "t.yaml", write_arch(tmp_path, "tiny128", TINY_128)))
    remats = ("none", "full")
    # On TPU the fused kernel only: xla attention can win on FLOPs while moving the [T, T] scores through HBM.
    assert plan_module.search_candidates(cfg, "tpu", remats=remats) == [("splash", r, None) for r in remats]
    assert plan_module.search_candidates(cfg, "cpu", remats=remats) == [("xla", r, None) for r in remats]
    assert plan_module.search_candidates(cfg, "tpu", ("xla", "splash"), remats, (None, 64)) == [
        (a, r, c) for a in ("xla", "splash") for r in remats for c in (None, 64)]


def test_search_chooses_the_fewest_flops_that_fit(tmp_path):
    init = write_arch(tmp_path, "tiny128", TINY_128)
    cfg = load_config(TrainConfig, train_yaml(tmp_path / "t.yaml", init))
    found = plan_module.plan_search(cfg, "v5e:2x2", remats=("none", "full"), min_headroom_gib=1.0,
                                    attentions=("xla",))
    by = {c.remat: c for c in found.candidates}
    assert set(by) == {"none", "full"} and {c.attention for c in found.candidates} == {"xla"}
    assert by["full"].step_flops > by["none"].step_flops  # full remat runs the forward twice
    splash = plan_module.plan_search(cfg, "v5e:2x2", remats=("full",), attentions=("splash",)).best
    # One tile: Splash does the same matmuls XLA would, counted by hand.
    assert splash.step_flops == pytest.approx(by["full"].step_flops, rel=0.05)
    fewest = min(c.step_flops for c in found.candidates)  # all fit this tiny model
    tied = [c for c in found.candidates if c.step_flops <= fewest * 1.005]  # a 0.5% FLOPs difference is a tie
    assert found.best is max(tied, key=lambda c: c.headroom_bytes)  # broken by headroom
    assert found.best.peak_step_seconds == pytest.approx(found.best.step_flops / (4 * 197e12))


def test_a_chunked_loss_counts_every_chunk(tiny, tmp_path):
    """XLA counts the chunk loop's body once; the plan adds the other chunks' output-layer matmuls back, so the
    chunked step's FLOPs match the whole-sequence step's (same matmuls, other elementwise work)."""
    cfg = load_config(TrainConfig, train_yaml(tmp_path / "t.yaml", tiny))
    cfg.model.attention = "xla"
    whole = plan(cfg, "v5e:2x2")
    cfg.model.logits_chunk = 32  # 4 chunks of the 128 positions
    chunked = plan(cfg, "v5e:2x2")
    arch = read_config(tiny)
    assert chunked.kernel_flops_per_step == 3 * 6.0 * 8 * 32 * arch.vocab_size * arch.hidden_size
    assert chunked.xla_flops_per_step < 0.9 * whole.xla_flops_per_step  # what the plan corrects
    assert chunked.step_flops == pytest.approx(whole.step_flops, rel=0.02)


@pytest.mark.parametrize("flag,value,bad", [("--remat", "full,dots", "dots"), ("--attention", "flash", "flash"),
                                            ("--remat", ",", "','")])
def test_unknown_search_names_are_one_line_naming_them(flag, value, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--topology", "v5e:2x2", "--search", flag, value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and err.startswith(f"clp-jax plan: error: argument {flag}: {bad}: expected names from")


def test_flops_within_half_a_percent_tie_broken_by_fused_kernel_then_headroom():
    from types import SimpleNamespace

    def cand(name, flops, headroom_gib, fits=True, attention="xla"):
        return SimpleNamespace(name=name, step_flops=flops, headroom_bytes=int(headroom_gib * 2**30), fits=fits,
                               xla_flops_per_step=flops, attention=attention)

    xla, splash = cand("xla", 1.000e15, 8.4), cand("splash", 1.004e15, 8.2, attention="splash")  # 0.4% more FLOPs
    light = cand("light", 0.990e15, 0.5)  # fewest FLOPs but under the 1 GiB asked for
    big = cand("none", 0.80e15, 40, fits=False)
    assert plan_module.choose_candidate([xla, splash, light, big], 2**30).name == "splash"  # kernel beats headroom
    roomy = cand("roomy", 1.003e15, 9.0)
    assert plan_module.choose_candidate([xla, roomy], 2**30).name == "roomy"  # no kernel tied: headroom decides
    assert plan_module.choose_candidate([xla, cand("slower", 1.006e15, 9.0, attention="splash")],
                                        2**30).name == "xla"  # 0.6%: no tie
    assert plan_module.choose_candidate([light], 0).name == "light"
    assert plan_module.choose_candidate([light, big], 2**30) is None
