"""Triton is optional: with it hidden, the kernels' CPU paths and the commands work, and asking for the
Triton path is a clear error.

Triton is hidden in a fresh interpreter (and every process it starts) by a ``sitecustomize`` on
PYTHONPATH: a meta-path finder refuses ``triton`` and its submodules, and ``sys.modules['triton'] = None``
makes ``importlib.util.find_spec('triton')`` return None, as for a package that is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

HIDE_TRITON = '''
import importlib.abc
import sys


class _HideTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None


sys.meta_path.insert(0, _HideTriton())
sys.modules["triton"] = None
'''

CHECKS = '''
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

assert importlib.util.find_spec("triton") is None
try:
    import triton  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("triton is not hidden")

from dqtool_kernels import consistency, distances, matching, quantization
from dqtool_kernels._runtime import pick_device, triton_available

assert not triton_available()
CLEAR = "the Triton path needs the triton package: pip install 'dqtool[triton]'"


def raises_clear(call):
    try:
        call()
    except ValueError as exc:
        assert str(exc) == CLEAR, str(exc)
    else:
        raise AssertionError("no error for the Triton path")


# the CPU paths agree with the references
rng = np.random.default_rng(0)
a, b = rng.normal(size=(7, 5)), rng.normal(size=(4, 5))
np.testing.assert_allclose(distances.sq_distances(a, b, device="cpu"), distances.sq_distances_reference(a, b))
np.testing.assert_array_equal(distances.min_sq_distances(a, b)[1], distances.min_sq_distances_reference(a, b)[1])
p = rng.uniform(size=(3, 64))
got = consistency.semantic_counts(p, p[::-1].copy(), device="cpu")
want = consistency.semantic_counts_reference(p, p[::-1].copy(), np.arange(3), 0.5)
for g, w in zip(got, want):
    np.testing.assert_allclose(g, w)
u = rng.integers(0, 4, size=(16, 16))
v = rng.integers(0, 4, size=(16, 16))
assert consistency.rand_pair_counts(u, v) == consistency.rand_pair_counts_reference(u, v)
ov, matches = matching.match_instances(u, u, (0.5,))
assert matches[0].tp == len(np.unique(u[u > 0]))
feats = rng.normal(size=(12, 4))
formed, _ = quantization.form_bins(feats, 3, device="cpu")
np.testing.assert_array_equal(np.sort(np.concatenate(formed)), np.arange(12))

# the Triton path: one clear error, from the dispatch and from the Triton functions themselves
raises_clear(lambda: pick_device("triton"))
raises_clear(lambda: distances.sq_distances(a, b, device="triton"))
raises_clear(lambda: distances.min_sq_distances(a, b, device="triton"))
raises_clear(lambda: distances._sq_distances_triton(a, b))
raises_clear(lambda: consistency.semantic_counts(p, p, device="triton"))
raises_clear(lambda: consistency.semantic_counts_triton(p, p, np.arange(3)))
raises_clear(lambda: consistency.rand_pair_counts(u, v, device="triton"))
raises_clear(lambda: consistency.rand_pair_counts_triton(u, v))
raises_clear(lambda: quantization.form_bins(feats, 3, device="triton"))

# the commands, each in its own process (which inherits the hidden Triton)
work = Path(sys.argv[1])


def dqtool(*args):
    out = subprocess.run([sys.executable, "-m", "dqtool", *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    return out.stdout


dqtool("data", work / "d", "--n-train", "1", "--n-test", "1", "--quiet")
dqtool("patches", work / "d" / "fluo", work / "d" / "histo", "--out", work / "c.h5", "--quiet")
assert "patches: 8" in dqtool("info", work / "c.h5")
np.save(work / "f.npy", rng.normal(size=(8, 6)).astype(np.float32))
dqtool("embed", work / "c.h5", "--features", work / "f.npy", "--quiet")
dqtool("select", work / "c.h5", "--rate", "0.5", "--bins", "2", "--out", work / "s.json", "--quiet")
for name in ("gt", "pred"):
    (work / name).mkdir()
    labels = np.kron(np.arange(4, dtype=np.uint16).reshape(2, 2), np.ones((8, 8), np.uint16))
    tifffile.imwrite(work / name / "a.tif", labels)
dqtool("eval", "--gt", work / "gt", "--pred", work / "pred", "--out", work / "e", "--quiet")
assert "triton" not in [m.split(".")[0] for m, mod in sys.modules.items() if mod is not None]
print("OK")
'''


def test_without_triton_the_cpu_paths_and_commands_work_and_triton_is_a_clear_error(tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(textwrap.dedent(HIDE_TRITON))
    (tmp_path / "checks.py").write_text(CHECKS)
    (tmp_path / "work").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(hide), *filter(None, [os.environ.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, str(tmp_path / "checks.py"), str(tmp_path / "work")], check=False,
                         env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert out.stdout.strip().endswith("OK")
