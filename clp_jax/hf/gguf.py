"""Convert a GGUF checkpoint (llama.cpp's format) into a Hugging Face model dir.

The file is memory-mapped with gguf-py's ``GGUFReader``; each tensor is dequantized with ``gguf.quants``, has
llama.cpp's layout changes undone (the rotary row permutation of Llama's q/k, Gemma's ``1 + w`` norms, GPT-2's
transposed projections), is cast and handed to ``write_model_dir`` before the next one is read. config.json and
the tokenizer come from the metadata as transformers' own GGUF loading reads them, plus what the file states and
that loader drops (Qwen3's head_dim, RoPE scaling, Llama 3's rope_freqs, Gemma 3's attention scale). No torch.
Everything is checked before anything is written.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from clp_jax.errors import ClpError
from clp_jax.files import require_file
from clp_jax.models.config import NP_DTYPES
from clp_jax.progress import bar


class Layout(NamedTuple):
    """One architecture's GGUF -> HF tensor names: top-level tensors, per-block tensors, the HF block prefix."""

    top: dict[str, str]
    block: dict[str, str]
    prefix: str
    hf_class: str


_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA3_BLOCK = {**_LLAMA_BLOCK, **_QK_NORMS, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_GPT2_BLOCK = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}

LAYOUTS: dict[str, Layout] = {
    "llama": Layout(_LLAMA_TOP, _LLAMA_BLOCK, "model.layers", "LlamaForCausalLM"),
    "qwen2": Layout(_LLAMA_TOP, _LLAMA_BLOCK, "model.layers", "Qwen2ForCausalLM"),
    "qwen3": Layout(_LLAMA_TOP, {**_LLAMA_BLOCK, **_QK_NORMS}, "model.layers", "Qwen3ForCausalLM"),
    "gemma3": Layout(_LLAMA_TOP, _GEMMA3_BLOCK, "model.layers", "Gemma3ForCausalLM"),
    "gpt2": Layout({"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                    "output_norm": "transformer.ln_f", "output": "lm_head"}, _GPT2_BLOCK, "transformer.h",
                   "GPT2LMHeadModel"),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(sorted(LAYOUTS))
_GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GgufFile(NamedTuple):
    """An opened GGUF file: its path, gguf-py's memory-mapped reader, and the metadata as Python values."""

    path: str
    reader: Any  # gguf.GGUFReader
    meta: dict[str, Any]

    @property
    def arch(self) -> str:
        return self.meta["general.architecture"]

    @property
    def tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}


def open_gguf(path: str) -> GgufFile:
    """The memory-mapped file and its metadata as Python values; a missing, non-GGUF or truncated file is a ClpError."""
    import gguf

    require_file(path, "GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ClpError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, IndexError, KeyError, TypeError, OSError, UnicodeDecodeError) as e:
        raise ClpError(f"{path}: unreadable GGUF file, truncated or corrupt ({str(e).splitlines()[0]})") from None
    if not isinstance(meta.get("general.architecture"), str):
        raise ClpError(f"{path}: no general.architecture in the GGUF metadata")
    return GgufFile(path, reader, meta)


def _need(gf: GgufFile, key: str) -> Any:
    value = gf.meta.get(f"{gf.arch}.{key}")
    if value is None:
        raise ClpError(f"{gf.path}: the GGUF metadata has no {gf.arch}.{key}")
    return value


def _legacy_config(gf: GgufFile) -> dict[str, Any]:
    """The config transformers' own GGUF loading reads (its key table), without its torch-only loader."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch, table = gf.arch, GGUF_CONFIG_MAPPING[gf.arch]
    cfg: dict[str, Any] = {"model_type": arch, "tie_word_embeddings": "output.weight" not in gf.tensor_names}
    for key, value in gf.meta.items():
        prefix, _, rest = key.partition(".")
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if prefix == arch and table.get(rest) is not None:
            cfg[table[rest]] = value
        elif prefix == "tokenizer" and GGUF_CONFIG_MAPPING["tokenizer"].get(rest) is not None:
            cfg[GGUF_CONFIG_MAPPING["tokenizer"][rest]] = value
    if "vocab_size" not in cfg and gf.meta.get("tokenizer.ggml.tokens"):
        cfg["vocab_size"] = len(gf.meta["tokenizer.ggml.tokens"])
    return cfg


def llama3_rope_parameters(freqs: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """HF llama3 ``rope_parameters`` reproducing llama.cpp's per-frequency ``rope_freqs`` divisors (None: all 1).

    Raises ValueError when no Llama 3 scaling reproduces them.
    """
    freqs = np.asarray(freqs, np.float64).reshape(-1)
    factor = float(freqs.max())
    if factor <= 1 + 1e-6:
        return None
    x = theta ** -(np.arange(0, head_dim, 2) / head_dim) / (2 * np.pi)  # 1 / wavelength
    mid = (freqs > 1 + 1e-4) & (freqs < factor * (1 - 1e-4))
    smooth = (1 / freqs[mid] - 1 / factor) / (1 - 1 / factor)  # = (orig * x - low) / (high - low)
    low = 1.0  # the divisors depend on orig / (high - low) and low / (high - low) only: fixing low loses nothing
    if mid.sum() >= 2:
        slope, intercept = np.polyfit(x[mid], smooth, 1)
        width = -low / intercept if intercept < 0 else float("nan")
        orig = slope * width
    elif mid.sum() == 1:  # one point: take Llama 3's high factor (4) too
        width = 3.0
        orig = (smooth[0] * width + low) / x[mid][0]
    else:
        orig = float("nan")
    params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
              "high_freq_factor": round(low + width, 4),
              "original_max_position_embeddings": int(round(orig)) if np.isfinite(orig) else 0}
    if not (np.isfinite(orig) and orig >= 1 and np.allclose(_llama3_divisors(params, x), freqs, rtol=1e-4)):
        raise ValueError("rope_freqs does not follow Llama 3 RoPE scaling")
    return params


def _llama3_divisors(params: dict[str, Any], x: np.ndarray) -> np.ndarray:
    """What transformers' llama3 RoPE divides each frequency by (x = 1 / wavelength)."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    smooth = np.clip((params["original_max_position_embeddings"] * x - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth) / factor + smooth)


def _rope_parameters(gf: GgufFile, theta: float, head_dim: int) -> dict[str, Any]:
    """HF ``rope_parameters`` from {arch}.rope.scaling.* (and Llama 3's rope_freqs tensor)."""
    get = lambda key: gf.meta.get(f"{gf.arch}.rope.scaling.{key}")  # noqa: E731
    kind, factor = get("type") or "none", get("factor")
    if "rope_freqs.weight" in gf.tensor_names:
        import gguf

        t = next(t for t in gf.reader.tensors if t.name == "rope_freqs.weight")
        try:
            params = llama3_rope_parameters(gguf.quants.dequantize(t.data, t.tensor_type), theta, head_dim)
        except ValueError as e:
            raise ClpError(f"{gf.path}: rope_freqs.weight: {e} (the only per-frequency scaling supported)") from None
        if params:
            return {**params, "rope_theta": theta}
    if kind == "none" or factor in (None, 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    if kind == "yarn":
        params = {"rope_type": "yarn", "factor": float(factor), "rope_theta": theta,
                  "original_max_position_embeddings": get("original_context_length")}
        for key in ("beta_fast", "beta_slow"):
            if get(f"yarn_{key}") is not None:
                params[key] = float(get(f"yarn_{key}"))
        return params
    raise ClpError(f"{gf.path}: RoPE scaling type {kind!r} is not supported (supported: none, linear, yarn)")


def _gemma3_config(gf: GgufFile, cfg: dict[str, Any]) -> None:
    """Gemma 3 as llama.cpp runs it: every 6th layer global, local RoPE base 10000, its attention scale."""
    layers, head_dim = cfg["num_hidden_layers"], cfg["head_dim"]
    pattern = gf.meta.get("gemma3.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # one flag per layer: true = sliding
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % pattern != 0 for i in range(layers)]
    cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    scale = gf.meta.get("gemma3.attention.scale")
    if scale:
        cfg["query_pre_attn_scalar"] = 1.0 / float(scale) ** 2
    else:  # llama.cpp: 1/sqrt(head_dim), except the 62-layer 27B's 1/sqrt(hidden/heads)
        cfg["query_pre_attn_scalar"] = (cfg["hidden_size"] // cfg["num_attention_heads"] if layers == 62
                                        else head_dim)
    local = float(gf.meta.get("gemma3.rope.freq_base_swa", 10000.0))
    cfg["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": local},
                              "full_attention": _rope_parameters(gf, float(cfg.pop("rope_theta", 1e6)), head_dim)}


def hf_config(gf: GgufFile) -> dict[str, Any]:
    """config.json content (before dtype) for the model the GGUF file describes."""
    import transformers

    arch = gf.arch
    cfg = _legacy_config(gf)
    for key in ("block_count", "embedding_length", "attention.head_count"):
        _need(gf, key)
    if arch == "gpt2":
        cfg.pop("n_ctx", None)
        cfg.pop("feed_forward_length", None)
        cfg.update(n_positions=_need(gf, "context_length"), n_inner=_need(gf, "feed_forward_length"))
    else:
        cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
        key_length = gf.meta.get(f"{arch}.attention.key_length")
        if key_length:  # llama.cpp's head size; transformers' table drops it for Qwen3
            cfg["head_dim"] = key_length
        elif arch != "qwen2":  # llama.cpp's default, where the config class's own default may differ
            cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        if arch == "gemma3":
            cfg["model_type"] = "gemma3_text"
            _gemma3_config(gf, cfg)
        else:
            cfg["rope_parameters"] = _rope_parameters(gf, float(cfg.pop("rope_theta", 10000.0)), head_dim)
        if arch == "llama":  # transformers' table has no bias flags; the tensors say
            names = gf.tensor_names
            cfg["attention_bias"] = "blk.0.attn_q.bias" in names
            cfg["mlp_bias"] = "blk.0.ffn_up.bias" in names
    cfg["architectures"] = [LAYOUTS[arch].hf_class]
    try:
        data = transformers.AutoConfig.for_model(**cfg).to_dict()
    except (ValueError, TypeError, KeyError) as e:
        raise ClpError(f"{gf.path}: the GGUF metadata gives no valid {cfg['model_type']} config "
                       f"({str(e).splitlines()[0]})") from None
    for key in ("torch_dtype", "_name_or_path", "transformers_version"):
        data.pop(key, None)
    return data


def expected_tensors(arch: str, config: dict[str, Any]) -> set[str]:
    """GGUF names the file must hold for this config (output.weight only when untied)."""
    layout = LAYOUTS[arch]
    top = {"token_embd.weight", "output_norm.weight"}
    if arch == "gpt2":
        top |= {"position_embd.weight", "output_norm.bias"}
    if not config["tie_word_embeddings"]:
        top.add("output.weight")
    biased = {"gpt2": set(_GPT2_BLOCK), "qwen2": {"attn_q", "attn_k", "attn_v"}}.get(arch, set())
    if config.get("attention_bias"):
        biased |= {"attn_q", "attn_k", "attn_v", "attn_output"}
    if config.get("mlp_bias"):
        biased |= {"ffn_gate", "ffn_up", "ffn_down"}
    block = {f"{k}.weight" for k in layout.block} | {f"{k}.bias" for k in biased}
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    return top | {f"blk.{i}.{n}" for i in range(layers) for n in block}


def hf_name(arch: str, gguf_name: str) -> str:
    """The HF parameter name of a GGUF tensor name."""
    layout = LAYOUTS[arch]
    m = _BLOCK_NAME.fullmatch(gguf_name)
    if m:
        return f"{layout.prefix}.{m[1]}.{layout.block[m[2]]}.{m[3]}"
    base, suffix = gguf_name.rsplit(".", 1)
    return f"{layout.top[base]}.{suffix}"


def unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Llama q/k row order (rotary halves interleaved per head) back to HF's."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_hf_layout(arch: str, config: dict[str, Any], gguf_name: str, w: np.ndarray) -> np.ndarray:
    """A dequantized float32 GGUF tensor in the layout the HF class stores it in."""
    if arch == "llama" and ".attn_q." in gguf_name:
        return unpermute_rotary(w, config["num_attention_heads"])
    if arch == "llama" and ".attn_k." in gguf_name:
        return unpermute_rotary(w, config["num_key_value_heads"])
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        return w - np.float32(1.0)
    if arch == "gpt2" and gguf_name.endswith(_GPT2_TRANSPOSED):
        return w.T
    return w


def dequantizable(qtype: Any) -> bool:
    """Whether gguf-py can dequantize this tensor type (probed on one zero block)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros(size, np.uint8), qtype)
    except (NotImplementedError, ValueError):
        return False
    return True


def check_tensors(gf: GgufFile, config: dict[str, Any]) -> list[Any]:
    """The file's tensors to convert, after checking names, completeness and quantization types."""
    expected = expected_tensors(gf.arch, config)
    names = gf.tensor_names
    unknown = sorted(names - expected - {"rope_freqs.weight"})
    if unknown:
        raise ClpError(f"{gf.path}: unexpected tensors for a {gf.arch} model: {', '.join(unknown[:5])}"
                       + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    missing = sorted(expected - names)
    if missing:
        raise ClpError(f"{gf.path}: missing tensors for a {gf.arch} model: {', '.join(missing[:5])}"
                       + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    tensors = [t for t in gf.reader.tensors if t.name in expected]
    for qtype in {t.tensor_type for t in tensors}:
        if not dequantizable(qtype):
            first = next(t.name for t in tensors if t.tensor_type == qtype)
            raise ClpError(f"{gf.path}: tensor {first} has quantization type {qtype.name}, which gguf cannot "
                           "dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, K-quants, IQ)")
    return tensors


def _hf_tensors(gf: GgufFile, config: dict[str, Any], tensors: list[Any],
                dtype: str) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in ``dtype``) per tensor, each dequantized and re-laid-out only when the writer asks."""
    import gguf

    for t in tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = to_hf_layout(gf.arch, config, t.name, w)
        yield hf_name(gf.arch, t.name), np.ascontiguousarray(w, dtype=NP_DTYPES[dtype])


def convert_gguf(gguf_path: str, out_dir: str, *, dtype: str = "float32", overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Write the GGUF checkpoint as an HF model dir (safetensors in ``dtype``, config, tokenizer); a summary back."""
    from clp_jax.hf.gguf_tokenizer import gguf_tokenizer
    from clp_jax.hf.writer import write_model_dir

    start = time.perf_counter()
    if dtype not in ("float32", "bfloat16"):
        raise ClpError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    if os.path.exists(out_dir) and not overwrite:
        raise ClpError(f"{os.path.abspath(out_dir)}: output directory exists (pass --overwrite to replace it)")
    gf = open_gguf(gguf_path)
    if gf.arch not in LAYOUTS:
        raise ClpError(f"{gguf_path}: GGUF architecture {gf.arch!r} is not supported "
                       f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    config = hf_config(gf)
    tensors = check_tensors(gf, config)
    tokenizer = gguf_tokenizer(gf.meta, config, gguf_path)
    config["dtype"] = dtype
    stream = bar(_hf_tensors(gf, config, tensors, dtype), total=len(tensors), desc=f"convert {gf.arch} gguf",
                 unit="tensor", disable=not progress)
    write_model_dir(out_dir, stream, len(tensors), config, tokenizer=tokenizer, overwrite=overwrite)
    return {"gguf": gguf_path, "out": out_dir, "architecture": gf.arch, "model_type": config["model_type"],
            "name": gf.meta.get("general.name"), "dtype": dtype, "tensors": len(tensors),
            "parameters": int(sum(t.n_elements for t in tensors)),
            "quantization": dict(sorted(Counter(t.tensor_type.name for t in tensors).items())),
            "tie_word_embeddings": bool(config["tie_word_embeddings"]),
            "seconds": round(time.perf_counter() - start, 3)}
