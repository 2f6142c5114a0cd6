"""The lazy command group: `dqtool --help` imports no command module, a command imports only its own,
and a check the library makes is not made again by the CLI (the library's one-line error, exit 1)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import dqtool_cli
from dqtool_cli.main import COMMANDS, cli

HEAVY = ("torch", "cellpose", "h5py", "dqtool.features.mae")


def _modules_after(code: str) -> tuple[set[str], str]:
    """Run ``code`` in a fresh interpreter; return the modules it ended with and its stdout."""
    script = code + "\nimport json, sys\nprint('\\nMODULES=' + json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    head, _, mods = out.stdout.rpartition("MODULES=")
    return set(json.loads(mods)), head


def _run_cli(*args: str) -> str:
    return f"from click.testing import CliRunner\nfrom dqtool_cli.main import cli\n" \
           f"r = CliRunner().invoke(cli, {list(args)!r})\nassert r.exit_code == 0, r.output\nprint(r.output)"


def test_group_help_lists_every_command_without_importing_one():
    modules, output = _modules_after(_run_cli("--help"))
    assert not {m for m in modules if m.startswith("dqtool_cli.cmd_")}
    assert not {m for m in modules if m.startswith(HEAVY)}
    for name, (_, short) in COMMANDS.items():
        assert f"  {name} " in output and short in output, name


def test_a_command_imports_only_its_own_module():
    modules, output = _modules_after(_run_cli("rank", "--help"))
    assert "Rank the Cellpose models in MODELS_DIR" in output
    assert {m for m in modules if m.startswith("dqtool_cli.cmd_")} == {"dqtool_cli.cmd_rank"}


def test_command_modules_import_nothing_heavy_at_module_level():
    names = [f"dqtool_cli.{m.name}" for m in pkgutil.iter_modules(dqtool_cli.__path__) if m.name.startswith("cmd_")]
    modules, _ = _modules_after("\n".join(f"import {name}" for name in names))
    assert not {m for m in modules if m.startswith(HEAVY)}


def test_the_table_names_every_command_once():
    """Each entry resolves to the Click command of that name; no command module defines one the table misses."""
    defined = {}
    for info in pkgutil.iter_modules(dqtool_cli.__path__):
        if info.name.startswith("cmd_"):
            module = importlib.import_module(f"dqtool_cli.{info.name}")
            for attr, value in vars(module).items():
                if isinstance(value, click.Command) and value.callback.__module__ == module.__name__:
                    defined[value.name] = f"{module.__name__}:{attr}"
    assert defined == {name: ref for name, (ref, _) in COMMANDS.items()}
    width_limit = 78 - 6 - max(map(len, COMMANDS))  # an 80-column terminal shows the short help whole
    assert all(len(short) <= width_limit for _, short in COMMANDS.values())


def test_unknown_command_and_removed_verbose_are_usage_errors():
    runner = CliRunner()
    res = runner.invoke(cli, ["nope"])
    assert res.exit_code == 2 and "No such command 'nope'" in res.output
    res = runner.invoke(cli, ["-v", "info", "--help"])  # --verbose was parsed and never read: removed
    assert res.exit_code == 2 and "No such option" in res.output


@pytest.mark.parametrize("args, message", [
    (["train", "c.h5", "--out", "m", "--bsize", "40"], "bsize = 40: expected a multiple of 16"),
    (["train", "c.h5", "--out", "m", "--epochs", "0"], "n_epochs = 0: expected a positive integer"),
    (["train", "c.h5", "--out", "m", "--learning-rate", "0"], "learning_rate = 0.0: expected > 0"),
    (["replay", "--init", "m", "--source", "s.h5", "--target", "t.h5", "--out", "o", "--source-rate", "0"],
     "source rate 0.0: expected a fraction in (0, 1]"),
])
def test_training_values_are_checked_once_by_the_library(tmp_path, monkeypatch, args, message):
    """The CLI's copies of these checks exited 2 with its own wording; now TrainConfig / replay say it."""
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1, res.output
    assert res.output.startswith(f"error: {message}") and len(res.output.strip().splitlines()) == 1


def test_rank_strength_is_checked_once_by_the_library(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "images").mkdir()
    res = CliRunner().invoke(cli, ["rank", str(tmp_path / "models"), "--images", str(tmp_path / "images"),
                                   "--strength", "1.5", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and res.output.strip() == "error: dropout strength 1.5: expected a rate in (0, 1)"


def test_embed_exclusive_inputs_are_checked_once_by_the_library(tmp_path):
    for name in ("c.h5", "w.pth", "f.npy"):
        (tmp_path / name).write_bytes(b"")
    res = CliRunner().invoke(cli, ["embed", str(tmp_path / "c.h5"), "--weights", str(tmp_path / "w.pth"),
                                   "--features", str(tmp_path / "f.npy")])
    assert res.exit_code == 1 and res.output.startswith("error: give either weights") and "not both" in res.output


@pytest.mark.parametrize("command", [["data", "out"], ["train", "c.h5", "--out", "m"], ["rank", ".", "--images", "."]])
def test_seed_is_a_non_negative_integer_everywhere(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, [*command, "--seed", "-1"])
    assert res.exit_code == 2 and "--seed" in res.output
