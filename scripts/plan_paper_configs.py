"""Re-run `clp-jax plan --search` for the paper configs (configs/train_*_german_*.yaml) on their topologies.

Each config names its topology and architecture in its `# clp-jax plan ... --topology T --init DIR` line. Per
config this prints the candidate table to stderr; the last stdout line is one JSON object: config -> the search
(every candidate's per-chip HBM, temporaries, FLOPs with recomputation, implied step time at peak; the choice).
Each 7B candidate compiles for minutes on a CPU host: pick configs and candidates with the flags.

    python scripts/plan_paper_configs.py --configs bloom7b1_german_v5e --remat full,save_qkv_proj
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

from clp_jax.cli.common import comma_names
from clp_jax.config import load_config
from clp_jax.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from clp_jax.train.config import TrainConfig
from clp_jax.train.plan import SEARCH_REMAT, plan_search

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"clp-jax plan .*--topology (\S+) --init (\S+)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="", help="comma-separated name parts, e.g. bloom7b1_german_v5e (default all)")
    p.add_argument("--attention", type=comma_names(ATTENTION_IMPLEMENTATIONS), default=None,
                   help="comma-separated implementations (default: the TPU kernel the model allows, else xla)")
    p.add_argument("--remat", type=comma_names(REMAT_POLICIES), default=SEARCH_REMAT,
                   help="comma-separated remat policies")
    p.add_argument("--min-headroom", type=float, default=1.0, help="GiB per chip the choice must leave free")
    args = p.parse_args(argv)
    wanted = [w for w in args.configs.split(",") if w]
    results = {}
    for path in sorted((ROOT / "configs").glob("train_*_german_*.yaml")):
        if wanted and not any(w in path.stem for w in wanted):
            continue
        topology, init = COMMAND.search(path.read_text()).groups()
        cfg = load_config(TrainConfig, path)
        cfg.model.init = str(ROOT / init)
        found = plan_search(cfg, topology, min_headroom_gib=args.min_headroom, attentions=args.attention,
                            remats=args.remat)
        print(f"== {path.name} on {topology}\n{found.format_table()}", file=sys.stderr, flush=True)
        results[path.name] = {"topology": topology, **found.as_dict()}
    if not results:
        p.error(f"no configs/train_*_german_*.yaml matches --configs {args.configs!r}")
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
