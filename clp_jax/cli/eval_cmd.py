"""`clp-jax eval`: perplexity and bits per byte of a Hugging Face model dir on a text file (one document per line)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Literal

import pydantic

from clp_jax.cli.common import add_config_args, print_result, resolve_config
from clp_jax.config import ConfigModel, save_config
from clp_jax.files import write_json
from clp_jax.sharding import MeshConfig, mesh_from_config


class EvalConfig(ConfigModel):
    """What `clp-jax eval` reads; flags set the same keys."""

    model: str
    data: str
    seq_len: int = pydantic.Field(1024, ge=2)
    batch_size: int = pydantic.Field(8, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    mesh: MeshConfig = MeshConfig()
    out: str | None = None


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "eval", parents=parents, help="perplexity of an HF model dir on a text file",
        description="Perplexity of a Hugging Face model dir on a text file. Each non-empty line is one document, "
                    "encoded with the model's tokenizer defaults, truncated to --seq-len tokens and never packed "
                    "with another; documents under 2 tokens are skipped. The last stdout line is JSON with loss "
                    "(mean next-token cross-entropy in nats over all predicted tokens), ppl, tokens, bytes (UTF-8 "
                    "bytes of the text the predicted tokens cover: from the end of the first token's span, BOS's "
                    "being empty, to the end of the last token's, or of the text when not truncated) and "
                    "bits_per_byte (summed loss / (ln 2 x bytes), comparable across tokenizers).")
    p.add_argument("--model", help="HF model dir (config.json, safetensors, tokenizer files)")
    p.add_argument("--data", help="UTF-8 text file, one document per line")
    p.add_argument("--seq-len", type=int, help="truncate documents to this many tokens (default 1024)")
    p.add_argument("--batch-size", type=int, help="documents per batch (default 8); does not change the result")
    p.add_argument("--dtype", help="compute dtype: float32 (default) or bfloat16; weights keep their dtype")
    p.add_argument("--out", help="optional dir to write eval.json and the resolved config.yaml")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clp_jax.eval.perplexity import evaluate_model_dir
    from clp_jax.files import atomic_dir

    cfg = resolve_config(EvalConfig, args, {"model": "model", "data": "data", "seq_len": "seq_len",
                                            "batch_size": "batch_size", "dtype": "dtype", "out": "out"})
    start = time.perf_counter()
    result = evaluate_model_dir(cfg.model, cfg.data, mesh_from_config(cfg.mesh), seq_len=cfg.seq_len,
                                batch_size=cfg.batch_size, dtype=cfg.dtype).to_dict()
    result["seconds"] = round(time.perf_counter() - start, 3)
    if cfg.out:
        def fill(tmp: str) -> None:
            save_config(cfg, os.path.join(tmp, "config.yaml"))
            write_json(os.path.join(tmp, "eval.json"), result)

        atomic_dir(cfg.out, fill, overwrite=True)
    print_result(result)
    return 0
