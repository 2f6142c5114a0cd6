"""Errors a user can cause. The CLI prints their message as one line and exits 1."""


class InputError(ValueError):
    """Bad input data or files: the message names the file, the value and what was expected."""


class MissingExtra(InputError):
    """An optional dependency is not installed: the message names the ``dqtool[extra]`` that installs it."""


def require_extra(module: str, extra: str, feature: str):
    """Import and return ``module``, or raise :class:`MissingExtra` naming ``pip install 'dqtool[extra]'``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{feature} needs the optional package {exc.name or module}: "
                           f"pip install 'dqtool[{extra}]'") from exc
