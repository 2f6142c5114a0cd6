"""``python -m dqtool``: the same entry point as the ``dqtool`` console script.

The command line is found through the package's own ``dqtool`` console-script entry point, so the
library never imports the CLI layer (imports go one way: ``dqtool_cli`` -> ``dqtool`` -> ``dqtool_kernels``).
"""

from importlib.metadata import entry_points


def main() -> None:
    (script,) = entry_points(group="console_scripts", name="dqtool")
    script.load()(prog_name="dqtool")


if __name__ == "__main__":  # pragma: no cover
    main()
