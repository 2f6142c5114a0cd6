"""Data commands: ``dqtool data``, ``dqtool patches``, ``dqtool info``."""

COMMANDS = []
