"""Run `clp-jax train` in a child process, optionally signalling itself after a given step (fault injection)."""

import os
import signal
import sys

from clp_jax.cli.common import print_result
from clp_jax.config import load_config
from clp_jax.train.config import TrainConfig
from clp_jax.train.loop import Trainer

if __name__ == "__main__":
    config, signal_name, at_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    overrides = sys.argv[4:]
    cfg = load_config(TrainConfig, config, overrides)

    def on_step(step):
        if signal_name != "none" and step == at_step:
            os.kill(os.getpid(), getattr(signal, signal_name))

    print_result(Trainer(cfg, progress=False).run(on_step))
