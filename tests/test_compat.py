"""Names users already call keep working from their old modules for this release (with a DeprecationWarning)."""

import importlib
import sys

import pytest

OLD = {
    "dqtool.metrics": ("instance_scores", "dqtool.evaluation.metrics"),
    "dqtool.rank": ("rank_models", "dqtool.ranking.rank"),
    "dqtool.consistency": ("adapted_rand", "dqtool.ranking.consistency"),
    "dqtool.cache": ("PatchCache", "dqtool.data.cache"),
}


@pytest.mark.parametrize("old", sorted(OLD))
def test_old_module_forwards_to_the_new_one(old):
    name, new = OLD[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
    assert name in dir(module)
    with pytest.raises(AttributeError, match="no attribute"):
        module.no_such_name


def test_old_cache_module_also_forwards_the_writer():
    sys.modules.pop("dqtool.cache", None)
    with pytest.warns(DeprecationWarning):
        import dqtool.cache as old
    from dqtool.data.cache_build import build_cache

    assert old.build_cache is build_cache


def test_python_m_dqtool_runs_the_cli():
    import subprocess

    out = subprocess.run([sys.executable, "-m", "dqtool", "--version"], capture_output=True, text=True, check=True)
    assert "dqtool, version" in out.stdout
