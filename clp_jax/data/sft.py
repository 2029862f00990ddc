"""Supervised fine-tuning examples: prompt/response token ids and batches with loss only on responses.

With a chat template, the prompt is the rendered user turn plus the generation prompt and the response is
the rest of the rendered conversation (assistant text and end-of-turn marks). Without one, the prompt is
`prompt + "\\n"` and the response is `response` + EOS. No BOS is added, as in pretraining packing.
Held-out rows also carry the UTF-8 bytes each response token covers (`clp_jax.data.tokenize.token_bytes` on the
response text; EOS 0), so the response loss can be reported in bits per byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clp_jax.data.packing import greedy_row_starts
from clp_jax.data.tokenize import encode_with_bytes
from clp_jax.errors import ClpError

PLAIN_SEPARATOR = "\n"

Example = tuple[Sequence[int], Sequence[int]]


def _render(tokenizer: Any, prompt: str, response: str) -> tuple[str, str, bool]:
    """(prompt text, response text, whether to append EOS) for one example."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt + PLAIN_SEPARATOR, response, True
    user = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ClpError("the tokenizer's chat template does not render the prompt with its generation prompt as the "
                       "start of the whole conversation, so the response tokens cannot be told apart")
    return prompt_text, full_text[len(prompt_text):], False


def format_examples(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) of each (prompt, response), tokenized in one batch per side."""
    rendered = [_render(tokenizer, p, r) for p, r in pairs]
    if any(eos for _, _, eos in rendered) and tokenizer.eos_token_id is None:
        raise ClpError("the tokenizer has neither a chat template nor an EOS token to end responses with")
    if not rendered:
        return []
    kwargs = {"add_special_tokens": False, "return_attention_mask": False, "verbose": False}
    prompt_ids = tokenizer([p for p, _, _ in rendered], **kwargs)["input_ids"]
    response_ids = tokenizer([r for _, r, _ in rendered], **kwargs)["input_ids"]
    return [(list(p), list(r) + ([tokenizer.eos_token_id] if eos else []))
            for p, r, (_, _, eos) in zip(prompt_ids, response_ids, rendered)]


def response_bytes(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[np.ndarray]:
    """UTF-8 bytes of the response text that each response token of `format_examples` covers (EOS: 0), int32."""
    rendered = [_render(tokenizer, p, r) for p, r in pairs]
    if not rendered:
        return []
    ids, nbytes = encode_with_bytes(tokenizer, [r for _, r, _ in rendered], add_special_tokens=False)
    per_example = np.split(nbytes, np.cumsum([len(x) for x in ids])[:-1])
    return [np.append(b, np.int32(0)) if eos else b for b, (_, _, eos) in zip(per_example, rendered)]


def truncate_example(prompt_ids: Sequence[int], response_ids: Sequence[int],
                     seq_len: int) -> tuple[Sequence[int], Sequence[int]]:
    """Fit an example into `seq_len`: trim the prompt from the left (keeping at least one token), then
    the response from the right."""
    if len(prompt_ids) + len(response_ids) <= seq_len:
        return prompt_ids, response_ids
    keep = max(seq_len - len(response_ids), min(len(prompt_ids), 1))
    prompt_ids = prompt_ids[len(prompt_ids) - keep:]
    return prompt_ids, response_ids[:seq_len - len(prompt_ids)]


def sft_batch(examples: Sequence[Example], seq_len: int, pad_id: int, pack: bool = False,
              response_bytes: Sequence[Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """[rows, seq_len] arrays `tokens`, `segment_ids`, `positions` and float32 `loss_weights`, plus int32
    `bytes` (each response token's `response_bytes`; prompt and padding 0) when those are given.

    `loss_weights[r, t]` is 1 exactly when token t + 1 is a response token of the same example, i.e. the
    weights go with next-token targets. One example per row, or greedily packed rows when `pack`.
    """
    if seq_len < 2:
        raise ClpError(f"seq_len must be >= 2, got {seq_len}")
    if response_bytes is not None and [len(b) for b in response_bytes] != [len(r) for _, r in examples]:
        raise ValueError("response_bytes must hold one count per response token of each example")
    fitted = [truncate_example(p, r, seq_len) for p, r in examples]
    n = len(fitted)
    lengths = np.array([len(p) + len(r) for p, r in fitted], dtype=np.int64)
    stream = np.fromiter((t for p, r in fitted for part in (p, r) for t in part), np.int32, count=int(lengths.sum()))
    is_response = np.fromiter((flag for p, r in fitted for flag in ([False] * len(p) + [True] * len(r))), bool,
                              count=len(stream))
    starts = greedy_row_starts(lengths, seq_len) if pack else np.arange(n, dtype=np.int64) * seq_len
    rows = n if not pack else (-(-int(starts[-1] + lengths[-1]) // seq_len) if n else 0)
    row_of = starts // seq_len
    segment = np.arange(n) - np.searchsorted(row_of, row_of) + 1  # examples never cross rows
    stream_starts = np.cumsum(lengths) - lengths
    dest = np.arange(len(stream)) + np.repeat(starts - stream_starts, lengths)

    tokens = np.full(rows * seq_len, pad_id, dtype=np.int32)
    segment_ids = np.zeros(rows * seq_len, dtype=np.int32)
    positions = np.zeros(rows * seq_len, dtype=np.int32)
    response = np.zeros(rows * seq_len, dtype=bool)
    tokens[dest] = stream
    segment_ids[dest] = np.repeat(segment, lengths)
    positions[dest] = dest - np.repeat(starts, lengths)
    response[dest] = is_response
    shape = (rows, seq_len)
    tokens, segment_ids, positions, response = (a.reshape(shape) for a in (tokens, segment_ids, positions, response))
    weights = np.zeros(shape, dtype=np.float32)
    weights[:, :-1] = response[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1])
    out = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions, "loss_weights": weights}
    if response_bytes is not None:
        kept = (np.concatenate([np.zeros(len(p), np.int32), np.asarray(b, np.int32)[:len(r)]])
                for (p, r), b in zip(fitted, response_bytes))
        stream_bytes = np.concatenate([np.zeros(0, np.int32), *kept])
        out_bytes = np.zeros(rows * seq_len, dtype=np.int32)
        out_bytes[dest] = stream_bytes
        out["bytes"] = out_bytes.reshape(shape)
    return out
