"""dqtool's command-line layer, imported as ``dqtool_cli`` (this folder is installed under that name).

Click commands that parse options and call one library function each; ``main.cli`` is the ``dqtool``
console script and imports a command's module only when that command runs.
"""
