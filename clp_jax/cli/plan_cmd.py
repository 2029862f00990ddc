"""`clp-jax plan`: will a training config fit a TPU slice? Compile its train step for the topology on any host."""

from __future__ import annotations

import argparse
import sys

import jax

from clp_jax.cli.common import add_config_args, comma_names, print_result, resolve_config
from clp_jax.errors import ClpError
from clp_jax.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from clp_jax.train.config import TrainConfig
from clp_jax.train.plan import SEARCH_REMAT, TOPOLOGY_EXAMPLES, parse_topology, plan, plan_search


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan", parents=parents, help="compile a train config for a TPU topology ahead of time: per-chip HBM, fit, "
                                      "FLOPs and tokens/s",
        description="Ahead-of-time compile the train step of a `clp-jax train` config for a TPU topology on this "
                    "host (needs libtpu: pip install \"jax[tpu]\"; no TPU, weights or data are touched; model.init "
                    "needs only its config.json) and report per chip: parameters, optimizer state, temporaries "
                    "(activations), total against the chip's HBM and whether it fits; FLOPs per step and the "
                    "tokens/s implied at --mfu. With --search, compile every candidate attention implementation "
                    "x remat policy (x logits chunk) and choose the fewest FLOPs per step (recomputation included) "
                    "that fits with --min-headroom GiB to spare. The table goes to stderr, one JSON line last on "
                    "stdout. Exit 0 whether it fits or not (see `fits` / `best`), 2 for bad input.")
    p.add_argument("--topology", required=True, metavar="GEN:AxB[xC]",
                   help=f"TPU slice, e.g. {', '.join(TOPOLOGY_EXAMPLES)}")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization assumed for tokens/s (default 0.4)")
    p.add_argument("--init", help="HF model dir (config.json is enough) whose architecture to plan (model.init)")
    p.add_argument("--search", action="store_true", help="plan the candidates below and choose the fastest that fits")
    p.add_argument("--attention", type=comma_names(ATTENTION_IMPLEMENTATIONS), metavar="A,B",
                   help="--search: attention implementations (default: what auto picks, the TPU kernel where the model "
                        "allows one, else xla)")
    p.add_argument("--remat", type=comma_names(REMAT_POLICIES), default=SEARCH_REMAT, metavar="P,Q",
                   help=f"--search: remat policies (default: {','.join(SEARCH_REMAT)})")
    p.add_argument("--logits-chunk", type=_chunks, metavar="N,M",
                   help="--search: model.logits_chunk values, 'null' for whole sequences (default: the config's)")
    p.add_argument("--min-headroom", type=float, default=1.0, metavar="GIB",
                   help="--search: HBM per chip the choice must leave free (default 1.0)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    parse_topology(args.topology)  # a bad name fails before anything slow
    if not 0 < args.mfu <= 1:
        raise ClpError(f"--mfu must be in (0, 1], got {args.mfu}")
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")  # plan compiles for the topology only; leave local TPUs alone
    cfg = resolve_config(TrainConfig, args, {"init": "model.init"})
    if args.search:
        found = plan_search(cfg, args.topology, args.mfu, args.min_headroom, args.attention, args.remat,
                            args.logits_chunk)
        print(found.format_table(), file=sys.stderr)
        print_result(found.as_dict())
        return 0
    report = plan(cfg, args.topology, args.mfu)
    print(report.format_table(), file=sys.stderr)
    if not report.fits:
        print(f"clp-jax plan: this config does NOT fit {args.topology}: it needs {report.total_bytes / 2**30:.2f} GiB "
              f"per chip of {report.hbm_bytes / 2**30:.2f} GiB (try --search, model.remat=full, a larger "
              "grad_accum_steps, another data/fsdp split of the mesh, or a bigger slice)", file=sys.stderr)
    print_result(report.as_dict())
    return 0


def _chunks(text: str) -> tuple[int | None, ...]:
    """An argparse type: comma-separated positive ints or 'null'."""
    try:
        chunks = tuple(None if c.strip() == "null" else int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers or null, comma-separated") from None
    if any(c is not None and c < 1 for c in chunks):
        raise argparse.ArgumentTypeError(f"{text!r}: chunks must be positive")
    return chunks
