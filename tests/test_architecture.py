"""The package's shape, checked on real runs: the import graph's rules, what ranking and `--help` load.

Issue 11: ranking a bank never imports the DQ selection, the MAE or the cache builder; `dqtool --help`
imports none of torch, Cellpose, h5py or the features. Each check runs in a fresh interpreter, so the
modules other tests loaded do not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: What ranking a bank must not load (it needs neither a selection, nor features, nor a cache).
NOT_FOR_RANKING = ("dqtool.selection", "dqtool.selection.quantize", "dqtool.features.mae", "dqtool.features.embed",
                   "dqtool.data.cache_build", "dqtool_kernels.quantization")
#: What listing the commands must not load.
NOT_FOR_HELP = ("torch", "cellpose", "h5py", "dqtool.features")


def _modules_after(code: str, keep: str | None = None):
    """The modules a fresh interpreter holds after running ``code`` (and, with ``keep``, the list that
    ``code`` printed after that marker first)."""
    script = code + "\nimport json, sys\nprint('MODULES=' + json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    final = set(json.loads(out.stdout.rpartition("MODULES=")[2]))
    if keep is None:
        return final
    return set(json.loads(out.stdout.split(keep, 1)[1].splitlines()[0])), final


def _loaded(modules: set[str], names: tuple[str, ...]) -> set[str]:
    return {m for m in modules for name in names if m == name or m.startswith(name + ".")}


def test_import_graph_check_passes():
    """No cycle, no import against the layers (cli -> dqtool -> kernels), at most 8 floors."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "import_graph.py"), "--check"], check=False,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr


#: One untrained Cellpose 3 model file and two 64 x 64 images of blobs.
_BANK = """
import numpy as np, tifffile
from pathlib import Path
from dqtool.segmentation.model_files import build_net
root = Path({root!r})
(root / "models").mkdir(parents=True)
(root / "images").mkdir()
build_net(None).save_model(str(root / "models" / "untrained"))
rng = np.random.default_rng(0)
yy, xx = np.mgrid[:64, :64]
for i in range(2):
    img = np.zeros((64, 64), np.float32)
    for cy, cx in rng.uniform(12, 52, size=(5, 2)):
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0)
    tifffile.imwrite(root / "images" / f"img{{i}}.tif", (255 * img / img.max()).astype(np.uint8))
"""


def test_ranking_loads_no_selection_features_or_cache_builder(tmp_path):
    """A real ``rank_models`` run, then ``dqtool rank``, in one fresh interpreter (Cellpose's import
    compiles its numba functions, ~15 s, so the two share it); the modules are taken after each."""
    bank = tmp_path / "bank"
    modules = _modules_after(
        _BANK.format(root=str(bank)) +
        "import json, sys\n"
        "from dqtool.ranking.rank import rank_models\n"
        f"result = rank_models({str(bank / 'models')!r}, {str(bank / 'images')!r}, out={str(tmp_path / 'r1')!r}, "
        "quiet=True)\n"
        "assert len(result.models) == 1, result\n"
        "print('LIBRARY=' + json.dumps(sorted(sys.modules)))\n"
        "from click.testing import CliRunner\nfrom dqtool_cli.main import cli\n"
        f"res = CliRunner().invoke(cli, ['rank', {str(bank / 'models')!r}, '--images', {str(bank / 'images')!r}, "
        f"'--out', {str(tmp_path / 'r2')!r}, '--quiet'])\n"
        "assert res.exit_code == 0, res.output\n", keep="LIBRARY=")
    library, after_cli = modules
    assert (tmp_path / "r1" / "rank.json").exists() and (tmp_path / "r2" / "rank.json").exists()
    assert "cellpose.models" in library  # the run was real
    assert not _loaded(library, NOT_FOR_RANKING), "rank_models"
    assert not _loaded(after_cli, NOT_FOR_RANKING), "dqtool rank"
    assert {m for m in after_cli if m.startswith("dqtool_cli.cmd_")} == {"dqtool_cli.cmd_rank"}


def test_help_loads_no_heavy_library():
    modules = _modules_after(
        "from click.testing import CliRunner\nfrom dqtool_cli.main import cli\n"
        "res = CliRunner().invoke(cli, ['--help'])\n"
        "assert res.exit_code == 0 and 'rank-study' in res.output, res.output\n")
    assert not _loaded(modules, NOT_FOR_HELP)
