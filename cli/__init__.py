"""dqtool's command-line layer: Click commands that parse options and call one library function each."""
