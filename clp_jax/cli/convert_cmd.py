"""`clp-jax convert`: a GGUF checkpoint (llama.cpp) as a Hugging Face model dir every command loads."""

from __future__ import annotations

import argparse

from clp_jax.cli.common import print_result
from clp_jax.hf.gguf import SUPPORTED_ARCHITECTURES, convert_gguf


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "convert", parents=parents, help="convert a GGUF checkpoint into an HF model dir",
        description="Convert a GGUF checkpoint into a Hugging Face model dir: safetensors (dequantized, in --dtype), "
                    "config.json, generation_config.json and the tokenizer, all from the GGUF file, as transformers' "
                    f"own GGUF loading reads it. Architectures: {', '.join(SUPPORTED_ARCHITECTURES)}. Nothing is "
                    "written unless the whole file converts. The last stdout line is JSON with architecture, "
                    "model_type, tensors, parameters, quantization (tensors per type) and seconds.")
    p.add_argument("--gguf", required=True, metavar="FILE", help="the .gguf file")
    p.add_argument("--out", required=True, metavar="DIR", help="the HF model dir to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the written weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print_result(convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite))
    return 0
