"""Running Triton kernel tests under the interpreter on CPU.

Triton decides interpretation when a kernel is decorated, so a test file's ``test_interp_*`` tests run in
a child pytest started with ``TRITON_INTERPRET=1`` (:func:`run_interpreted_child`); in the parent they
are skipped by the :data:`interp` mark and nothing global changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERP, reason="runs in test_interpreted_suite's TRITON_INTERPRET=1 child")
ROOT = Path(__file__).resolve().parents[2]


def run_interpreted_child(test_file: str) -> None:
    """Run ``test_file``'s ``test_interp_*`` tests in a ``TRITON_INTERPRET=1`` child pytest; fail on any
    failure, or when they were all skipped."""
    if INTERP:
        pytest.skip("already the interpreted child")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-x", "-p", "no:cacheprovider",
           "-k", "interp_"]
    res = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout[-2000:]
