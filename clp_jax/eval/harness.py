"""EleutherAI lm-evaluation-harness backend: the model name ``clp-jax`` over our jitted decoder and KV cache.

Requests follow lm-eval's Hugging Face backend: ``loglikelihood`` scores a continuation's tokens after its
context (``context + continuation`` encoded whole, left-truncated to ``max_length + 1`` tokens); rolling
log-likelihood scores a text encoded without special tokens, after the BOS token (EOS without one), in
disjoint windows of ``max_length`` tokens that each keep a full window of context; ``generate_until`` decodes
greedily (or samples with ``do_sample``) up to ``max_gen_toks`` from contexts left-truncated to
``max_length - max_gen_toks`` tokens and cuts the text at the first stop string. Requests run in batches of
``batch_size`` rows sorted by length, padded to a few bucketed lengths so few shapes compile.

lm-eval 0.4.13 finds models only in its own registry (no entry points): importing this module registers
``clp-jax``, and ``python -m clp_jax.eval.harness ARGS`` (or ``clp-jax lm-eval ARGS``) runs lm-eval's CLI with it.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from clp_jax import models
from clp_jax.errors import ClpError
from clp_jax.eval.perplexity import check_eval_fits, eval_rows
from clp_jax.hf.reader import eos_ids, load_params, read_config
from clp_jax.hf.tokenizer import check_tokenizer_fits, load_tokenizer
from clp_jax.models.config import TransformerConfig
from clp_jax.models.layers import softcap
from clp_jax.posttrain.generate import bucket_length, generate_arrays, left_pad, pad_token_id
from clp_jax.sharding import batch_sharding, make_mesh, tree_shardings

MODEL_NAME = "clp-jax"
DEFAULT_BATCH_SIZE = 16  # for batch_size=auto: lm-eval's memory probing needs torch
LOGITS_CHUNK = 64  # positions whose float32 logits exist at once when scoring
GEN_KWARGS = {"do_sample", "temperature", "top_k"}  # besides until and max_gen_toks, which lm-eval normalizes


def token_logprobs(params: Any, cfg: TransformerConfig, tokens: jax.Array, targets: jax.Array,
                   segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Float32 log-probability of ``targets[:, t]`` after ``tokens[:, :t + 1]`` and whether it is the argmax,
    [B, T] each; logits exist for ``LOGITS_CHUNK`` positions at a time."""
    hidden = models.hidden_states(params, cfg, tokens, segment_ids=segment_ids)
    w, vocab_major = models.output_layer(params, cfg)
    b, t, e = hidden.shape
    chunk = min(t, LOGITS_CHUNK)
    pad = -t % chunk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, e).swapaxes(0, 1)
    tg = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)

    def one(xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        h, tg = xs
        logits = jnp.einsum("bce,ve->bcv" if vocab_major else "bce,ev->bcv", h, w, preferred_element_type=jnp.float32)
        logits = softcap(logits, cfg.final_softcap)
        picked = jnp.take_along_axis(logits, tg[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == tg

    logprob, greedy = jax.lax.map(one, (h, tg))
    return logprob.swapaxes(0, 1).reshape(b, -1)[:, :t], greedy.swapaxes(0, 1).reshape(b, -1)[:, :t]


def make_score_step(cfg: TransformerConfig, mesh: jax.sharding.Mesh, params: Any, rows: int) -> Callable:
    """``token_logprobs`` jit-compiled with parameter and batch shardings from the rules table."""
    p_shard = tree_shardings(models.param_axes(cfg), params, mesh)
    b = batch_sharding(mesh, (rows, 1))
    fn = jax.jit(lambda p, tokens, targets, seg: token_logprobs(p, cfg, tokens, targets, seg),
                 in_shardings=(p_shard, b, b, b))
    return lambda p, *arrays: fn(p, *(jax.device_put(a, b) for a in arrays))


def score_continuations(params: Any, step: Callable, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        rows: int, max_length: int) -> list[tuple[float, bool]]:
    """(log-probability summed in float64, whether greedy decoding yields it) of each continuation after its
    context; ``context + continuation`` is left-truncated to ``max_length + 1`` tokens, so the model sees at most
    ``max_length``. ``step`` is a ``make_score_step`` for batches of ``rows``."""
    seqs = [list(ctx) + list(cont) for ctx, cont in pairs]
    seqs = [s[-(max_length + 1):] for s in seqs]
    lengths = [len(cont) for _, cont in pairs]
    if any(n < 1 or n > max_length for n in lengths) or any(not ctx for ctx, _ in pairs):
        raise ValueError("each request needs a context and 1 to max_length continuation tokens")
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    for start in range(0, len(order), rows):
        idx = order[start:start + rows]
        t = min(bucket_length(len(seqs[idx[0]]) - 1), max_length)
        tokens, targets, seg = (np.zeros((rows, t), np.int32) for _ in range(3))
        for r, i in enumerate(idx):
            n = len(seqs[i]) - 1
            tokens[r, :n], targets[r, :n], seg[r, :n] = seqs[i][:-1], seqs[i][1:], 1
        logprob, greedy = jax.device_get(step(params, tokens, targets, seg))
        for r, i in enumerate(idx):
            n, c = len(seqs[i]) - 1, lengths[i]
            out[i] = float(logprob[r, n - c:n].astype(np.float64).sum()), bool(greedy[r, n - c:n].all())
    return out


def rolling_windows(ids: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows: (context, continuation) pairs predicting every token of ``ids`` once,
    after ``prefix_id``, each with up to ``max_length`` tokens of context."""
    windows = lm_utils.get_rolling_token_windows(token_list=list(ids), prefix_token=prefix_id,
                                                 max_seq_len=max_length, context_len=1)
    return [lm_utils.make_disjoint_window(w) for w in windows]


def stop_token_ids(tokenizer: Any, stops: Sequence[str]) -> list[int]:
    """Ids of stop strings that are one token whose text contains them: generation may end at those early
    (the text is cut at the stop string anyway)."""
    ids = []
    for s in stops:
        enc = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(enc) == 1 and s in tokenizer.decode(enc):
            ids.append(int(enc[0]))
    return ids


def until_stop(row: Sequence[int], eos: set[int], stops: set[int]) -> list[int]:
    """A generated row up to its first EOS (excluded) or stop-string token (kept: its text holds the stop)."""
    for j, t in enumerate(row):
        if t in eos:
            return list(row[:j])
        if t in stops:
            return list(row[:j + 1])
    return list(row)


def _positive(name: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ClpError(f"model_args: {name} must be a positive integer, got {value!r}")
    return number


def _batch_size(value: Any) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return DEFAULT_BATCH_SIZE
    return _positive("batch_size", value)


@register_model(MODEL_NAME)
class ClpJaxLM(TemplateLM):
    """An HF model dir (any `clp-jax` family: transferred, trained, converted from GGUF) as an lm-eval model."""

    def __init__(self, pretrained: str, batch_size: int | str = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 max_gen_toks: int = 256, dtype: str = "float32", fsdp: int = 1, tensor: int = 1, seed: int = 0,
                 device: str | None = None, max_batch_size: int | None = None) -> None:
        super().__init__()
        if dtype not in ("float32", "bfloat16"):
            raise ClpError(f"model_args: dtype must be float32 or bfloat16, got {dtype!r}")
        self.pretrained = str(pretrained)
        cfg = read_config(self.pretrained, dtype=dtype)
        self.tokenizer = load_tokenizer(self.pretrained)
        check_tokenizer_fits(self.tokenizer, cfg.vocab_size, self.pretrained)
        if self.tokenizer.eos_token_id is None:
            raise ClpError(f"{self.pretrained}: the tokenizer has no EOS token, which lm-eval's requests need")
        self._max_length = cfg.max_position_embeddings if max_length is None else _positive("max_length", max_length)
        if cfg.position == "learned" and self._max_length > cfg.max_position_embeddings:
            raise ClpError(f"{self.pretrained}: max_length {self._max_length} exceeds the model's "
                           f"{cfg.max_position_embeddings} learned positions")
        self._max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        self._batch = _batch_size(batch_size)
        self.seed = int(seed)
        self.mesh = make_mesh(data=-1, fsdp=_positive("fsdp", fsdp), tensor=_positive("tensor", tensor))
        self.rows = eval_rows(self.mesh, self._batch)
        self.cfg, self.params = load_params(self.pretrained, self.mesh, cfg, progress=False)
        self.eos = eos_ids(self.pretrained, self.tokenizer)
        self._step: Callable | None = None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ClpJaxLM:
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> ClpJaxLM:
        """The model from ``--model_args``; lm-eval's own ``--batch_size`` and ``--device`` fill only keys not
        given there."""
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(arg_dict) - known)
        if unknown:
            raise ClpError(f"model_args: unknown key {unknown[0]!r}; {MODEL_NAME} takes {', '.join(sorted(known))}")
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else int(bos)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids with the tokenizer's defaults, but no second BOS when the text (a chat rendering) has one."""
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer(string, return_attention_mask=False, **special)["input_ids"])

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def _score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        if not pairs:
            return []
        longest = max(len(ctx) + len(cont) for ctx, cont in pairs) - 1
        check_eval_fits(self.cfg, self.mesh, self.rows, min(bucket_length(longest), self.max_length))
        if self._step is None:
            self._step = make_score_step(self.cfg, self.mesh, self.params, self.rows)
        return score_continuations(self.params, self._step, pairs, rows=self.rows, max_length=self.max_length)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        results = self._score([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood after the BOS (else EOS) token, in lm-eval's disjoint rolling windows."""
        pairs, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            windows = rolling_windows(self.tok_encode(text, add_special_tokens=False), self.prefix_token_id,
                                      self.max_length)
            pairs += windows
            owner += [i] * len(windows)
        totals = np.zeros(len(requests), np.float64)
        np.add.at(totals, np.asarray(owner, np.int64), [lp for lp, _ in self._score(pairs)])
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Completions cut at the first stop string, batched per distinct generation kwargs."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out = [""] * len(args)
        for idx in groups.values():
            texts = self._generate_group([args[i][0] for i in idx], args[idx[0]][1])
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", args[i], text)
        return out

    def _generate_group(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        n = kwargs.pop("max_gen_toks")
        unsupported = sorted(set(kwargs) - GEN_KWARGS)
        if unsupported:
            raise ClpError(f"generation kwarg {unsupported[0]!r} is not supported by {MODEL_NAME} "
                           f"(it takes until, max_gen_toks, {', '.join(sorted(GEN_KWARGS))})")
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        top_k = kwargs.get("top_k")
        keep = self.max_length - n
        if keep < 1:
            raise ClpError(f"max_gen_toks {n} leaves no room for context in max_length {self.max_length}")
        prompts = [self.tok_encode(c)[-keep:] or [self.prefix_token_id] for c in contexts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        extra = set(stop_token_ids(self.tokenizer, until)) - set(self.eos)
        pad = pad_token_id(self.tokenizer)
        out = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            tokens, lengths = left_pad([prompts[i] for i in idx], pad, self.rows)  # one shape per prompt bucket
            ids, _ = generate_arrays(self.params, self.cfg, tokens, lengths, max_new_tokens=n,
                                     eos_id=sorted(set(self.eos) | extra), pad_id=pad, temperature=temperature,
                                     top_k=None if top_k is None else int(top_k), seed=self.seed + start,
                                     mesh=self.mesh)
            for r, i in enumerate(idx):
                text = self.tokenizer.decode(until_stop(ids[r].tolist(), set(self.eos), extra),
                                             skip_special_tokens=True)
                out[i] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
        return out

def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own CLI (``lm-eval ARGS``) with ``clp-jax`` registered; ``--model`` defaults to it."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "ls", "validate", "-h", "--help"):
        argv = ["run", *argv]  # what lm-eval itself does when the subcommand is left out
    if argv[:1] == ["run"] and not {"--model", "-M"} & set(argv):
        argv = ["run", "--model", MODEL_NAME, *argv[1:]]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
