"""``python -m dqtool``: the same entry point as the ``dqtool`` console script."""

from dqtool_cli.main import cli

if __name__ == "__main__":  # pragma: no cover
    cli(prog_name="dqtool")
