"""`clp-jax transfer`: parse the flags, run `clp_jax.transfer.run.run_transfer`, print its summary."""

from __future__ import annotations

import argparse

from clp_jax.cli.common import add_config_args, print_result, resolve_config
from clp_jax.transfer.validate import (
    ALL_STRATEGIES,
    DEFAULT_STRATEGY,
    HELPER_STRATEGIES,
    MAX_NORM_FACTOR,
    MIN_MEAN_COS,
)

OPTIONS_HELP = f"""\
strategies:
  clp            the paper: cos(h_i, h_j) / sum_k cos(h_i, h_k) weights over the shared tokens j
  clp-topk       softmax(cos / temperature) over the top_k most similar shared tokens (WECHSEL)
  clp-sparsemax  sparsemax(cos / temperature) over all shared tokens (FOCUS / CLP+)
  omp            orthogonal matching pursuit of h_i over omp_k shared helper rows; its coefficients applied
                 to their source rows (mergekit tokensurgeon's idea)
  fvt            mean of the source rows of the pieces the source tokenizer splits the token's text into
                 (Fast Vocabulary Transfer); needs no helper model, only --helper-tokenizer (default: best
                 after continued pretraining on both pairs measured, see README Results)
  random, mean, overlap, from-scratch   the paper's baselines; they need no helper model either

config keys (set as key=value after the flags, or in --config):
  top_k=10, temperature=0.1   clp-topk / clp-sparsemax weights
  omp_k=64                    omp: shared tokens per missing token
  center_helper=false         clp*, omp: subtract the mean helper row of the shared tokens before the
                              cosines (omp then maps offsets from the shared means in both spaces)
  match_norms=false           rescale every computed row to the mean row norm of the shared source rows
                              (of all source rows for random and overlap)
  min_mean_cos={MIN_MEAN_COS!s:<15}clp: a row whose cosine sum is <= min_mean_cos x (shared tokens) is
                              ill-conditioned (0 gives the paper's rule, sum <= 0)
  max_norm_factor={MAX_NORM_FACTOR!s:<12}every strategy: a row longer than max_norm_factor x the longest source
                              row is ill-conditioned
  ill-conditioned rows get the mean of the shared source rows (random, overlap: of all source rows) and
  are counted by reason in transfer_report.json
  matching=auto|exact|canonical, seed, block_size, max_shard_bytes, mesh.data/fsdp/tensor
"""


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "transfer", parents=parents, help="CLP-Transfer: build a target-language model from a source + helper",
        description="CLP-Transfer (Ostendorff & Rehm 2023). The target model is the source model with its "
                    "embeddings replaced for the target (helper's) tokenizer: shared tokens copy the source row, "
                    "other tokens are built from the shared tokens' source rows by the strategy (clp, the "
                    "paper's: a cosine-weighted average in the helper's embedding space; fvt, the default: the "
                    "mean of the source rows of the token's pieces in the source tokenizer). Writes a Hugging "
                    "Face dir with the target tokenizer and transfer_report.json. "
                    f"Strategies: {', '.join(ALL_STRATEGIES)}.",
        epilog=OPTIONS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="large source-language HF model dir (with tokenizer)")
    p.add_argument("--helper", help="small target-language HF model dir (its input embeddings are used); needed by "
                                    f"{', '.join(HELPER_STRATEGIES)}")
    p.add_argument("--out", help="output HF model dir (refused if it exists, unless --overwrite)")
    p.add_argument("--helper-tokenizer", help="target tokenizer dir if not in --helper (enough for fvt, mean, random, "
                                              "overlap, from-scratch)")
    p.add_argument("--strategy", help=f"embedding initialization: {', '.join(ALL_STRATEGIES)} "
                                      f"(default {DEFAULT_STRATEGY}; the paper's: clp)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out dir")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from clp_jax.transfer.run import TransferConfig, run_transfer

    cfg = resolve_config(TransferConfig, args, {
        "source": "source", "helper": "helper", "out": "out", "helper_tokenizer": "helper_tokenizer",
        "strategy": "strategy", "overwrite": "overwrite"})
    print_result(run_transfer(cfg))
    return 0


__all__ = ["register", "run"]
