"""Fixtures of the fault suite (the harness itself is ``faultkit``, importable by any fault test)."""

from __future__ import annotations

import pytest
from faultkit import assert_one_line, assert_untouched, run_dqtool, snapshot


@pytest.fixture
def refused(tmp_path):
    """``refused(args, names=..., code=1, cwd=tmp_path, allow_new=())``: run dqtool in a subprocess on the
    folder ``cwd`` and assert one line naming ``names``, exit ``code``, every pre-existing file unchanged."""

    def check(args, names=(), code=1, cwd=None, allow_new=()):
        cwd = cwd or tmp_path
        before = snapshot(cwd)
        result = run_dqtool(args, cwd)
        line = assert_one_line(result, code, names)
        assert_untouched(before, snapshot(cwd), allow_new)
        return line

    return check
