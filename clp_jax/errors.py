"""User-facing errors: one clear line naming the file and the problem."""


class ClpError(Exception):
    """An error caused by the user's input (files, flags, configs), shown without a traceback."""
