"""Per-language, per-task evaluation of a fine-tuned model: generated answers scored (also with wrong-language
answers as failures, `eval.language_id`), plus response loss and bits per byte from the held-out step
(``eval.heldout.make_heldout_step``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from clp_jax.data.sft import format_examples, response_bytes, sft_batch
from clp_jax.eval.language_id import in_expected_language
from clp_jax.eval.metrics import score_task
from clp_jax.eval.perplexity import bits_per_byte
from clp_jax.models.config import TransformerConfig
from clp_jax.posttrain.generate import generate, pad_token_id
from clp_jax.sharding import batch_divisor, batch_sharding

RESPONSE_METRICS = ("response_loss", "response_bpb")


def response_metrics(params: Any, heldout_step: Callable, mesh: Mesh, formatted: Sequence, token_bytes: Sequence,
                     seq_len: int, pad_id: int) -> dict[str, float]:
    """Mean next-token cross-entropy over response tokens only (nats), and in bits per response byte."""
    batch = sft_batch(formatted, seq_len, pad_id, response_bytes=token_bytes)
    rows = batch["tokens"].shape[0]
    target = -(-rows // batch_divisor(mesh)) * batch_divisor(mesh)
    batch = {k: np.pad(v, ((0, target - rows), (0, 0))) for k, v in batch.items()}
    batch = {k: jax.device_put(v, batch_sharding(mesh, v.shape)) for k, v in batch.items()}
    m = jax.device_get(heldout_step(params, batch))
    total = float(m["loss_sum"])
    return {"response_loss": total / max(float(m["tokens"]), 1.0),
            "response_bpb": bits_per_byte(total, float(m["bytes"]))}


def evaluate_examples(params: Any, cfg: TransformerConfig, tokenizer: Any, mesh: Mesh, heldout_step: Callable,
                      sets: Mapping[tuple[str, str], Sequence[Mapping[str, str]]], kinds: Mapping[str, str], *,
                      max_new_tokens: int, seq_len: int) -> list[dict[str, Any]]:
    """One row per (task, language): the task's metrics on greedy generations (`score_task`, language-checked
    against every language of `sets`), response loss and bpb."""
    pad_id = pad_token_id(tokenizer)
    candidates = sorted({language for _, language in sets})
    rows = []
    for (task, language), examples in sets.items():
        pairs = [(e["inputs"], e["targets"]) for e in examples]
        formatted = format_examples(tokenizer, pairs)
        window = min(seq_len, cfg.max_position_embeddings) if cfg.position == "learned" else seq_len
        prompts = [list(p[-max(window - max_new_tokens, 1):]) for p, _ in formatted]  # keep the question's end
        ids = generate(params, cfg, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                       pad_id=pad_id, mesh=mesh)
        predictions = tokenizer.batch_decode(ids, skip_special_tokens=True)
        scores = score_task(kinds[task], predictions, [e["targets"] for e in examples],
                            language_ok=in_expected_language(predictions, language, candidates))
        rows.append({"task": task, "language": language, **scores,
                     **response_metrics(params, heldout_step, mesh, formatted, response_bytes(tokenizer, pairs),
                                        seq_len, pad_id),
                     "example": {"prompt": examples[0]["inputs"], "reference": examples[0]["targets"],
                                 "prediction": predictions[0]}})
    return rows
