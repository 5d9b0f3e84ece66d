"""The watcher's status page (`/ui`) in a real browser against the lab: headless Chromium (Debian's
`chromium`), run inside the lab's control namespace, loads the page from the watcher, lists every
VIP the lab serves and both directors from the status board, and takes a screenshot."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kube2ipvs.cli import main
from kube2ipvs.lab import PORTS, prefix
from kube2ipvs.labplan import CTL
from tests.root.labfixture import running_lab

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
NAME = f"u{os.getpid() % 1_000_000}"
URL = f"http://{CTL}:{PORTS['watcher']}/ui"


def cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["lab", *args, "--name", NAME], out=out, err=err)
    return code, out.getvalue() + err.getvalue()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if shutil.which("chromium") is None:
        pytest.skip("needs chromium (Debian's chromium package; `make install` installs it)")
    with running_lab(NAME, tmp_path_factory.mktemp("lab")):
        code, text = cli("status", "--json")
        assert code == 0, text
        report: dict[str, Any] = json.loads(text)
        yield report


def chromium(tmp: Path, *args: str) -> str:
    """Headless Chromium in the lab's control namespace (where the watcher listens); its stdout."""
    cmd = ["ip", "netns", "exec", prefix(NAME) + "ctl", "chromium", "--headless", "--no-sandbox", "--disable-gpu",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--no-first-run", "--window-size=1280,900", *args, URL]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chromium_shows_every_vip_and_both_directors_and_takes_a_screenshot(
        lab: dict[str, Any], tmp_path: Path) -> None:
    vips = sorted({v["vip"] for v in lab["vips"]})
    assert vips
    # The directors publish on the status board with every reconcile; the lab is up once they did.
    deadline = time.monotonic() + 30
    while True:
        dom = chromium(tmp_path, "--dump-dom")
        if ("dir1" in dom and "dir2" in dom) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for vip in vips:
        assert f'id="vip-{vip}"' in dom, vip
    assert "dir1" in dom
    assert "dir2" in dom
    assert "status board unavailable" not in dom
    for pod in lab["pods"]:
        assert pod in dom, pod  # the lab's pod addresses, under their nodes

    shot = tmp_path / "ui.png"
    chromium(tmp_path, f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000  # a page with tables, not a blank or error page
    print(f"screenshot of {URL}: {shot} ({len(data)} bytes)")
