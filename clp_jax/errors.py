"""User-facing errors: one clear line naming the file and the problem."""


class ClpError(Exception):
    """An error caused by the user's input (files, flags, configs), shown without a traceback."""


class ClpWarning(UserWarning):
    """Something the user should know that does not stop the command; `clp-jax` shows it as one line."""
