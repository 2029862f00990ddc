"""Run `clp-jax train` (the CLI, exit code included) in a child process, optionally signalling itself after a
given step (fault injection)."""

import os
import signal
import sys

from clp_jax.cli.main import main
from clp_jax.train import loop
from clp_jax.train.loop import Trainer


class FaultTrainer(Trainer):
    """The CLI's Trainer, without a progress bar, sending ``signal_name`` to this process after ``at_step``."""

    signal_name, at_step = "none", 0

    def __init__(self, cfg):
        super().__init__(cfg, progress=False)

    def run(self, on_step=None):
        def kill_at(step):
            if self.signal_name != "none" and step == self.at_step:
                os.kill(os.getpid(), getattr(signal, self.signal_name))

        return super().run(kill_at)


if __name__ == "__main__":
    config, FaultTrainer.signal_name, FaultTrainer.at_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    loop.Trainer = FaultTrainer  # what the CLI instantiates
    sys.exit(main(["train", "--config", config, *sys.argv[4:]]))
