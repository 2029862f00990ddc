"""Attention implementations behind ``TransformerConfig.attention``: which kernel computes softmax(q k) v.

``xla`` is ``layers.dot_product_attention`` (the [B, H, T, S] scores in memory; any mask, bias or soft cap).
``splash`` is the Pallas TPU Splash kernel shipped in JAX (blockwise, never materializes the scores; causal
and sliding-window masks, packed documents through segment ids, soft cap, GQA), run per device under
``shard_map`` with the batch and head axes of the rules table. ``cudnn`` is ``jax.nn.dot_product_attention``
with cuDNN's fused kernel on NVIDIA GPUs (the mask and ALiBi bias go in as its arguments). ``auto`` picks
splash on TPU and cudnn on GPU where the model allows it, xla otherwise; decoding with a KV cache always
uses xla.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from clp_jax.errors import ClpError
from clp_jax.models.config import TransformerConfig
from clp_jax.models.layers import dot_product_attention
from clp_jax.sharding import logical_to_spec

Array = jax.Array
# The backward pass may keep the attention output (and Splash its softmax statistics) under this name.
CONTEXT = "context"
SPLASH_BLOCK = 512  # Splash tile (MaxText's default), cut to the sequence when that is shorter
_PLATFORM_KERNEL = {"tpu": "splash", "gpu": "cudnn"}
_KERNEL_PLATFORM = {"splash": "tpu", "cudnn": "gpu"}


def unsupported(cfg: TransformerConfig, implementation: str, seq_len: int | None = None) -> str | None:
    """Why ``implementation`` cannot compute ``cfg``'s attention in training (None: it can), as a fix-it hint;
    with ``seq_len``, also whether the kernel tiles that length."""
    if implementation == "splash" and cfg.position == "alibi":
        return ("the Splash kernel cannot add ALiBi position biases (BLOOM); set model.attention=xla "
                "(or auto)")
    if implementation == "splash" and seq_len is not None and (seq_len % splash_block(seq_len)
                                                               or splash_block(seq_len) % 128):
        return (f"the Splash kernel needs data.seq_len a multiple of 128 (and of {SPLASH_BLOCK} past it), "
                f"got {seq_len}; set model.attention=xla (or auto)")
    if implementation == "cudnn":
        if cfg.compute_dtype not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN flash attention needs bfloat16 or float16 compute, not {cfg.dtype}; set model.dtype=bfloat16"
        if cfg.attn_softcap is not None:
            return (f"cuDNN flash attention has no soft cap (the model caps scores at {cfg.attn_softcap}); "
                    "set model.attention=xla (or auto)")
        if cfg.head_dim % 8 or cfg.head_dim > 256:
            return f"cuDNN flash attention needs head_dim a multiple of 8 up to 256, not {cfg.head_dim}"
    return None


def choose(cfg: TransformerConfig, platform: str, cached: bool = False, seq_len: int | None = None) -> str:
    """The implementation ``cfg.attention`` means on ``platform`` (tpu, gpu, cpu); a ClpError when it cannot run.

    ``auto`` falls back to xla where its kernel cannot serve the model; a KV cache always takes xla.
    """
    if cached or cfg.attention == "xla":
        return "xla"
    if cfg.attention == "auto":
        kernel = _PLATFORM_KERNEL.get(platform)
        return kernel if kernel is not None and unsupported(cfg, kernel, seq_len) is None else "xla"
    reason = unsupported(cfg, cfg.attention, seq_len)
    if reason:
        raise ClpError(f"model.attention={cfg.attention}: {reason}")
    if platform != _KERNEL_PLATFORM[cfg.attention]:
        raise ClpError(f"model.attention={cfg.attention} runs on {_KERNEL_PLATFORM[cfg.attention].upper()}s, "
                       f"this run is on {platform}; set model.attention=auto (or xla)")
    return cfg.attention


def current_platform() -> str:
    """The platform being traced for: the set mesh's devices (``clp-jax plan`` traces for a TPU on a CPU host),
    else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve(cfg: TransformerConfig, platform: str, seq_len: int | None = None) -> TransformerConfig:
    """``cfg`` with ``attention`` the concrete implementation for ``platform`` and sequences of ``seq_len`` (what
    ``auto`` means there)."""
    return cfg.replace(attention=choose(cfg, platform, seq_len=seq_len))


def attend(implementation: str, q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None,
           segment_ids: Array, scale: float, softcap: float | None, window: int | None) -> Array:
    """Causal attention by ``implementation``; q [B,T,H,D], k/v [B,S,KV,D] -> [B,T,H,D].

    ``mask`` [B,1,T,S] (xla, cudnn) is ``layers.attention_mask``; ``segment_ids`` [B,T] (splash) say the same
    for positions that count up by one within each document, as packing writes them.
    """
    if implementation == "splash":
        return splash_attention(q, k, v, segment_ids, scale, softcap, window)
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, mask, bias, scale, window)
    return dot_product_attention(q, k, v, mask, bias, scale, softcap)


def cudnn_attention(q: Array, k: Array, v: Array, mask: Array, bias: Array | None, scale: float,
                    window: int | None, implementation: str = "cudnn") -> Array:
    """``jax.nn.dot_product_attention`` over a causal mask, window and ALiBi ``bias`` [B,H,1,S] (T == S).

    The bias goes in relative to each query's own key (``bias[s] - bias[t]``: softmax ignores a per-row
    constant), so in bfloat16 the nearby keys, which carry the weight, keep their precision.
    """
    if bias is not None:
        diagonal = jnp.swapaxes(bias, -1, -2)  # [B, H, S, 1]: query t's own key bias
        bias = (bias - diagonal).astype(q.dtype)
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=True,
                                        local_window_size=local, implementation=implementation)


def splash_block(length: int) -> int:
    """The Splash tile for a sequence of ``length``: ``SPLASH_BLOCK`` or the whole sequence when shorter."""
    return min(SPLASH_BLOCK, length)


def splash_mask(length: int, heads: int, window: int | None) -> splash.MultiHeadMask:
    """Splash's static mask for ``heads`` heads: causal, and ``window`` keys back (the query's own included)."""
    shape = (length, length)
    one = splash.CausalMask(shape) if window is None else splash.LocalMask(shape, (window - 1, 0), 0)
    return splash.MultiHeadMask([one] * heads)


def splash_train_flops(cfg: TransformerConfig, rows: int, length: int, recomputed: bool) -> float:
    """Matmul FLOPs the Splash kernels do in one training step over ``rows`` sequences (XLA's cost analysis
    cannot see inside them): per tile the kernel visits, 2 matmuls forward, 3 for dq and 4 for dk/dv backward,
    and the forward again when remat recomputes it. Partly masked tiles count whole, as the kernel runs them."""
    block = splash_block(length)
    tiles = 0
    for window in (cfg.layer_window(i) for i in range(cfg.num_layers)):
        dense = np.asarray(splash_mask(length, 1, window).masks[0][:, :])
        tiles += int(dense.reshape(length // block, block, length // block, block).any(axis=(1, 3)).sum())
    matmuls = 2 + 3 + 4 + (2 if recomputed else 0)
    return float(2 * matmuls * rows * cfg.num_heads * cfg.head_dim * block * block * tiles)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, scale: float, softcap: float | None,
                     window: int | None, interpret: bool = False) -> Array:
    """Splash attention, under ``shard_map`` over the batch and head axes when a mesh is set (TPU, or any
    backend with ``interpret``); segment 0 (padding) keys are seen only by padding queries."""
    t, s = q.shape[1], k.shape[1]
    block = splash_block(t)
    if t != s or t % block or (not interpret and block % 128):
        raise ClpError(f"model.attention=splash needs data.seq_len a multiple of 128 (or under {SPLASH_BLOCK} "
                       f"and a multiple of 128), got {t}; set model.attention=xla")
    local = functools.partial(_splash_local, scale=scale, softcap=softcap, window=window, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh)
    kv_spec = logical_to_spec(("batch", "length", "kv_heads", "head_dim"), k.shape, mesh)
    if q.shape[2] != k.shape[2] and q_spec[2] != kv_spec[2]:  # grouped heads must stay with their k/v head
        q_spec = PartitionSpec(q_spec[0], None, kv_spec[2], None)
        kv_spec = PartitionSpec(kv_spec[0], None, kv_spec[2], None)
    seg_spec = PartitionSpec(q_spec[0], None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)


def _splash_local(q: Array, k: Array, v: Array, segment_ids: Array, scale: float, softcap: float | None,
                  window: int | None, interpret: bool) -> Array:
    """Splash on this device's rows and heads: MHA when k/v have every head, else MQA per k/v head."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    block = splash_block(t)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    make = splash.make_splash_mha if kv == h else splash.make_splash_mqa
    kernel = make(splash_mask(t, h // kv if kv != h else h, window), block_sizes=sizes, head_shards=1,
                  q_seq_shards=1, attn_logits_soft_cap=softcap, residual_checkpoint_name=CONTEXT,
                  interpret=interpret)
    qh = (q.astype(jnp.float32) * np.float32(scale)).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, H, T, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
    if kv == h:
        out = jax.vmap(kernel)(qh, kh, vh, segment_ids=ids)
    else:  # [B, KV, G, T, D] queries against their k/v head's [S, D]
        per_head = jax.vmap(lambda qg, kg, vg, i: kernel(qg, kg, vg, segment_ids=i), in_axes=(0, 0, 0, None))
        out = jax.vmap(per_head)(qh.reshape(b, kv, h // kv, t, d), kh, vh, ids)
        out = out.reshape(b, h, t, d)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)
