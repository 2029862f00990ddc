"""`clp-jax plan`: will a training config fit a TPU slice? Compile its train step for the topology on any host."""

from __future__ import annotations

import argparse
import sys

import jax

from clp_jax.cli.common import add_config_args, print_result, resolve_config
from clp_jax.errors import ClpError
from clp_jax.train.config import TrainConfig
from clp_jax.train.plan import TOPOLOGY_EXAMPLES, parse_topology, plan


def register(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan", parents=parents, help="compile a train config for a TPU topology ahead of time: per-chip HBM, fit, "
                                      "FLOPs and tokens/s",
        description="Ahead-of-time compile the train step of a `clp-jax train` config for a TPU topology on this "
                    "host (needs libtpu: pip install \"jax[tpu]\"; no TPU, weights or data are touched; model.init "
                    "needs only its config.json) and report per chip: parameters, optimizer state, temporaries "
                    "(activations), total against the chip's HBM and whether it fits; FLOPs per step and the "
                    "tokens/s implied at --mfu. The table goes to stderr, one JSON line last on stdout. Exit 0 "
                    "whether it fits or not (see `fits`), 2 for bad input.")
    p.add_argument("--topology", required=True, metavar="GEN:AxB[xC]",
                   help=f"TPU slice, e.g. {', '.join(TOPOLOGY_EXAMPLES)}")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization assumed for tokens/s (default 0.4)")
    p.add_argument("--init", help="HF model dir (config.json is enough) whose architecture to plan (model.init)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    parse_topology(args.topology)  # a bad name fails before anything slow
    if not 0 < args.mfu <= 1:
        raise ClpError(f"--mfu must be in (0, 1], got {args.mfu}")
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")  # plan compiles for the topology only; leave local TPUs alone
    cfg = resolve_config(TrainConfig, args, {"init": "model.init"})
    report = plan(cfg, args.topology, args.mfu)
    print(report.format_table(), file=sys.stderr)
    if not report.fits:
        print(f"clp-jax plan: this config does NOT fit {args.topology}: it needs {report.total_bytes / 2**30:.2f} GiB "
              f"per chip of {report.hbm_bytes / 2**30:.2f} GiB (try model.remat=true, a larger grad_accum_steps, "
              "another data/fsdp split of the mesh, or a bigger slice)", file=sys.stderr)
    print_result(report.as_dict())
    return 0
