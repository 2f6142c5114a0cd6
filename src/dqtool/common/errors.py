"""Errors a user can cause. The CLI prints their message as one line and exits 1."""


class InputError(ValueError):
    """Bad input data or files: the message names the file, the value and what was expected."""
