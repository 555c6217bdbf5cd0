"""The benchmark scripts' own plumbing (the figures themselves come from running them, not from tests)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_bench_common_imports_where_stackllama_is_not_installed(tmp_path):
    """The TRL 1.12 baseline runs in its own venv without our package: its worker imports bench/common.py."""
    code = f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import common; print(common.rss_now_mb() > 0)"
    # -S: no site-packages, so only the working tree can provide stackllama (as in bench/.venv-trl)
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
