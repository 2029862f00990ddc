"""Run `clp-jax train` (the CLI, exit code included) in a child process, optionally signalling itself after a
given step (fault injection); tests import ``fault_trainer`` to do the same in their own process."""

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


def fault_trainer(signal_name: str, at_step: int) -> type[FaultTrainer]:
    """A FaultTrainer sending ``signal_name`` ("none": nothing) after ``at_step``, to stand in for loop.Trainer."""
    return type("FaultTrainerAt", (FaultTrainer,), {"signal_name": signal_name, "at_step": at_step})


if __name__ == "__main__":
    loop.Trainer = fault_trainer(sys.argv[2], int(sys.argv[3]))  # what the CLI instantiates
    sys.exit(main(["train", "--config", sys.argv[1], *sys.argv[4:]]))
