"""Hugging Face import/export: transformers loads our export with identical logits; round trips are exact."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from hf_models import TINY, make_hf_model, torch_logits
from safetensors.numpy import load_file

from clp_jax import models
from clp_jax.errors import ClpError
from clp_jax.hf.reader import TensorFiles, load_params, read_config, read_generation_config
from clp_jax.hf.writer import hf_config_dict, save_pretrained
from clp_jax.models.config import NUMERICS_FIELDS, TransformerConfig
from clp_jax.sharding import make_mesh


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied", "qwen2", "bloom-6heads", "qwen3-tied-window",
                                  "gemma3-softcap", "gemma2"])
def test_export_loads_in_transformers_with_identical_logits(name, tmp_path, en_tokenizer):
    hf = make_hf_model(name)
    src = tmp_path / "src"
    hf.save_pretrained(src)
    en_tokenizer.save_pretrained(src)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    cfg, params = load_params(str(src), mesh, progress=False)
    out = tmp_path / "out"
    base = json.loads((src / "config.json").read_text())
    save_pretrained(str(out), params, cfg, base_config=base, tokenizer=en_tokenizer, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists(), "small max_shard_bytes must shard"
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf)
    ids = np.random.default_rng(0).integers(0, 300, (2, 9))
    mask = np.ones_like(ids)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask), torch_logits(hf, ids, mask))
    assert transformers.AutoTokenizer.from_pretrained(out)("the house")["input_ids"] == \
        en_tokenizer("the house")["input_ids"]
    cfg2, params2 = load_params(str(out), make_mesh(data=-1), progress=False)
    assert cfg2 == cfg and leaves_equal(params, params2)


@pytest.mark.parametrize("name", ["qwen3-gqa-untied", "qwen3-tied-window", "gemma3", "gemma3-softcap", "gemma2"])
def test_fresh_config_from_ours_describes_the_same_model(name, tmp_path):
    """Without the source's config.json, ``to_hf`` writes one that transformers builds the same model from."""
    hf = make_hf_model(name)
    hf.save_pretrained(tmp_path / "src")
    cfg, params = load_params(str(tmp_path / "src"), make_mesh(data=-1), progress=False)
    save_pretrained(str(tmp_path / "out"), params, cfg)
    assert read_config(str(tmp_path / "out")) == cfg
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(hf)
    ids = np.random.default_rng(1).integers(0, 300, (2, 12))
    mask = np.ones_like(ids)
    np.testing.assert_array_equal(torch_logits(reloaded, ids, mask), torch_logits(hf, ids, mask))


def test_every_field_is_architecture_or_numerics():
    fields = [f.name for f in dataclasses.fields(TransformerConfig)]
    assert len(set(NUMERICS_FIELDS)) == len(NUMERICS_FIELDS) and set(NUMERICS_FIELDS) <= set(fields)
    cfg = models.family("gpt2").from_hf(transformers.GPT2Config(n_layer=1))
    assert list(cfg.architecture()) == [f for f in fields if f not in NUMERICS_FIELDS]


@pytest.mark.parametrize("name", list(TINY))
def test_config_json_records_the_architecture_and_none_of_the_numerics(name):
    spec = dict(TINY[name])
    hf = getattr(transformers, spec.pop("cls"))(**spec)
    cfg = models.family(hf.model_type).from_hf(hf).replace(dtype="bfloat16", param_dtype="float16", remat=True,
                                                             logits_chunk=8)
    data = hf_config_dict(cfg, base=hf.to_dict())
    assert not {"param_dtype", "remat", "logits_chunk"} & set(data)
    assert data["dtype"] == "float16"  # HF's "dtype" is the stored weights' (param_dtype), not the compute dtype
    assert hf_config_dict(cfg.replace(dtype="float32", remat=False, logits_chunk=None), base=hf.to_dict()) == data
    back = models.family(cfg.arch).from_hf(transformers.AutoConfig.for_model(**data))
    assert back.architecture() == cfg.architecture()


def test_generation_config_reader(tmp_path):
    assert read_generation_config(str(tmp_path)) == {}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 2], "do_sample": true}')
    assert read_generation_config(str(tmp_path)) == {"eos_token_id": [1, 2], "do_sample": True}
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    _expect_error(lambda: read_generation_config(str(tmp_path)), "generation_config.json", "JSON object")
    (tmp_path / "generation_config.json").write_text("{")
    _expect_error(lambda: read_generation_config(str(tmp_path)), "generation_config.json", "not valid JSON")


def test_multimodal_gemma3_config_says_to_use_the_text_model(tmp_path):
    transformers.Gemma3Config(text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=8)).save_pretrained(tmp_path)
    _expect_error(lambda: read_config(str(tmp_path)), "config.json", "'gemma3'", "gemma3_text")


def test_bfloat16_checkpoint_keeps_its_dtype_and_round_trips_bit_identical(tmp_path):
    hf = make_hf_model("llama-tied").to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "src")
    cfg = read_config(str(tmp_path / "src"))
    assert cfg.param_dtype == "bfloat16" and cfg.dtype == "float32"
    cfg, params = load_params(str(tmp_path / "src"), make_mesh(data=-1), cfg, progress=False)
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    save_pretrained(str(tmp_path / "out"), params, cfg)
    a = load_file(str(tmp_path / "src" / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)), k


def test_reads_pytorch_model_bin_and_unprefixed_names(tmp_path):
    hf = make_hf_model("gpt2")
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}  # original GPT-2 naming
    (tmp_path / "m").mkdir()
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m" / "model.safetensors").exists()
    cfg, params = load_params(str(tmp_path / "m"), make_mesh(data=-1), progress=False)
    hf.save_pretrained(tmp_path / "ref")
    _, ref = load_params(str(tmp_path / "ref"), make_mesh(data=-1), progress=False)
    assert leaves_equal(params, ref)


def test_params_are_sharded_by_the_rules_table(tmp_path):
    make_hf_model("llama-gqa-untied").save_pretrained(tmp_path)
    _, params = load_params(str(tmp_path), make_mesh(data=1, fsdp=2, tensor=4), progress=False)
    q = params["layers_0"]["attn"]["q"]["kernel"]  # (embed, heads, head_dim) -> (fsdp, tensor, -)
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (16, 1, 8)
    emb = params["embed"]["embedding"]  # vocab 300 = 4 * 75 takes tensor; 8 does not divide it, so embed takes fsdp
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    _, params = load_params(str(tmp_path), make_mesh(data=1, fsdp=1, tensor=8), progress=False)
    assert params["embed"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, None)


def _expect_error(fn, *fragments):
    with pytest.raises(ClpError) as e:
        fn()
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_bad_checkpoints_give_one_clear_line(tmp_path):
    mesh = make_mesh(data=-1)
    _expect_error(lambda: read_config(str(tmp_path / "nope")), "nope", "not found")
    (tmp_path / "empty").mkdir()
    _expect_error(lambda: read_config(str(tmp_path / "empty")), "config.json not found")
    bert = tmp_path / "bert"
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(bert)
    _expect_error(lambda: read_config(str(bert)), "config.json", "unsupported model_type 'bert'")
    wrong = tmp_path / "wrong"
    make_hf_model("gpt2").save_pretrained(wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["n_embd"] = 48
    (wrong / "config.json").write_text(json.dumps(cfg))
    _expect_error(lambda: load_params(str(wrong), mesh, progress=False), "model.safetensors", "wte.weight",
                  "contradicts config.json")
    noweights = tmp_path / "noweights"
    make_hf_model("gpt2").config.save_pretrained(noweights)
    _expect_error(lambda: TensorFiles(str(noweights)), "no model.safetensors")


def test_failed_export_leaves_nothing(tmp_path):
    make_hf_model("gpt2").save_pretrained(tmp_path / "src")
    cfg, params = load_params(str(tmp_path / "src"), make_mesh(data=-1), progress=False)
    del params["ln_f" if "ln_f" in params else "final_norm"]
    with pytest.raises(KeyError):
        save_pretrained(str(tmp_path / "out"), params, cfg)
    assert sorted(os.listdir(tmp_path)) == ["src"]
    save_pretrained(str(tmp_path / "ok"), *load_params(str(tmp_path / "src"), make_mesh(data=-1), progress=False)[::-1])
    with pytest.raises(ClpError, match="exists"):
        save_pretrained(str(tmp_path / "ok"), *load_params(str(tmp_path / "src"), make_mesh(data=-1),
                                                               progress=False)[::-1])
