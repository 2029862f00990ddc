"""User-facing errors: one clear line naming the file and the problem."""


class ClpError(Exception):
    """An error caused by the user's input (files, flags, configs), shown without a traceback."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM after saving; run the same command again to resume


class Preempted(ClpError):
    """A run stopped by a preemption signal after saving its checkpoint; the same command resumes it (exit 75)."""


def stopped_run_error(run_dir: str, summary: dict) -> ClpError:
    """The error for a Trainer run inside a larger pipeline (a study, the demo) that did not finish."""
    cls = Preempted if summary["status"] == "preempted" else ClpError
    return cls(f"{run_dir}: training stopped at step {summary['step']} ({summary['status']}); rerun the same "
               "command to resume it")


class ClpWarning(UserWarning):
    """Something the user should know that does not stop the command; `clp-jax` shows it as one line."""
