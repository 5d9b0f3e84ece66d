"""Coverage-guided fuzzing of the byte parsers (tests/fuzz/atheris_targets.py), a bounded number
of inputs each, from the versioned bad-input corpus: every input parses within the rules or is
refused with the parser's own error. It found the file source's crash on `"kind": {}`
(tests/test_watcher_files.py). Longer runs: `.venv/bin/python -m tests.fuzz.atheris_targets
TARGET -runs=1000000`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNS = {"config": 30_000, "bucket": 30_000, "objects": 8_000}  # about 5 s each here


@pytest.mark.parametrize("target", sorted(RUNS))
def test_no_input_crashes_a_parser_or_breaks_what_it_promises(target: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.atheris_targets", target, f"-runs={RUNS[target]}", "-seed=1",
         f"-artifact_prefix={tmp_path}/", "-max_len=4096"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    tail = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, tail
    assert f"Done {RUNS[target]} runs" in done.stderr, tail
    assert not list(tmp_path.iterdir()), tail  # no crash input written
