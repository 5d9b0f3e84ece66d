"""A lab for a test module: `kube2ipvs lab up` on a copy of lab/cluster/, always brought down.

Skips, with the reason, without root or the tools the lab needs. The copy is the test's to edit
(scaling, removing a node): the repository's lab/cluster/ stays as it is.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kube2ipvs.cli import main
from kube2ipvs.lab import missing_tools

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RunningLab:
    cluster: Path  # the copy of lab/cluster/ the lab follows
    up_output: str  # what `lab up` printed


@contextlib.contextmanager
def running_lab(name: str, tmp: Path) -> Iterator[RunningLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the lab creates network namespaces")
    if (missing := missing_tools()):
        pytest.skip(f"needs {', '.join(missing)}")
    cluster = tmp / "cluster"
    cluster.mkdir()
    for f in (REPO / "lab" / "cluster").iterdir():
        shutil.copy(f, cluster / f.name)
    out = io.StringIO()
    try:
        code = main(["lab", "up", "--name", name, "--cluster", str(cluster)], out=out, err=out)
        assert code == 0, out.getvalue()
        yield RunningLab(cluster, out.getvalue())
    finally:
        main(["lab", "down", "--name", name], out=io.StringIO(), err=io.StringIO())
