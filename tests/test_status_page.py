"""Issue 18: the HTML status page at `GET /`, rendered by a real headless Chromium."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.pgcluster import PgCluster, free_port, wait_for

CHROMIUM = shutil.which("chromium")
HOSTILE = '<script>alert(1)</script><img src=x onerror=alert(2)>"&'

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian package chromium (make deps-system)"
)


def chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Headless Chromium, offline: no sync, updates or background requests."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="backupd-chromium-") as profile:
        return subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def text_of(fragment: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


@pytest.fixture
def daemon(
    tmp_path: Path, pg: PgCluster, sample_db: str, config_file: ConfigFile
) -> Iterator[tuple[DaemonProcess, str]]:
    port = free_port()
    hostile = HOSTILE.replace("\\", "\\\\").replace('"', '\\"')
    cfg = config_file(
        sample_db,
        http_listen=f"127.0.0.1:{port}",
        extra_job={"retention": {"keep_last": 2}},
        extra=f'[job.bad]\nsource = "main"\nstorage = ["local"]\ndatabases = ["{hostile}"]\n',
    )
    d = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:
        yield d, f"http://127.0.0.1:{port}/"
    finally:
        d.stop()


@pytest.mark.slow
@needs_chromium
def test_status_page_in_chromium(daemon: tuple[DaemonProcess, str], tmp_path: Path) -> None:
    d, url = daemon
    for _ in range(3):
        assert d.cli("trigger", "app", "--wait").returncode == 0
    assert d.cli("trigger", "bad", "--wait").returncode == 1

    with urllib.request.urlopen(url, timeout=10) as resp:
        body = resp.read().decode()
        headers = resp.headers
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    # Nothing from the config's DSNs or secrets, and no markup from hostile text.
    for leak in ("127.0.0.1", "postgresql://", "postgres@", "password", str(d.config.parent)):
        assert leak not in body, leak
    assert "<script" not in body and "<img" not in body
    # No external asset, no script: no tag has a src, href or event handler attribute.
    assert re.search(r"<[^>]*\s(?:src|href|on\w+)=", body) is None
    assert "<link" not in body
    # Read-only: nothing but GET and HEAD.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""), timeout=10)
    assert refused.value.code == 405
    refused.value.close()

    dom = chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "<title>backupd status</title>" in page
    app_row = re.search(r'<tr data-job="app">(.*?)</tr>', page, re.S)
    bad_row = re.search(r'<tr data-job="bad">(.*?)</tr>', page, re.S)
    assert app_row and bad_row
    assert text_of(app_row.group(1)).startswith("app success")
    assert "KiB" in text_of(app_row.group(1)) and " ago" in text_of(app_row.group(1))
    bad = text_of(bad_row.group(1))
    assert bad.startswith("bad failure")
    # The hostile database name is shown as text, and the DSN is scrubbed from the error.
    assert f"database does not exist: {HOSTILE} on <dsn>" in bad
    assert "<script" not in page and re.search(r"<[^>]*\s(?:src|on\w+)=", page) is None
    section = re.search(r'<section class="job-section" data-job="app">(.*?)</section>', page, re.S)
    assert section is not None
    # Three runs, retention keeps two: the page lists what storage holds, not every run.
    assert section.group(1).count('<rect class="size"') == 2
    assert '<polyline class="duration"' in section.group(1)
    assert section.group(1).split("<tbody>")[1].count("<tr>") == 2

    png = tmp_path / "status.png"
    shot = chromium(f"--screenshot={png}", "--window-size=1200,900", "--hide-scrollbars", url)
    assert shot.returncode == 0, shot.stderr[-2000:]
    wait_for(png.exists, 10, what="the screenshot")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (
            'connection to server at "db.example.com" (10.1.2.3), port 5432 failed',
            'connection to server at "<host>" (<address>), port 5432 failed',
        ),
        ('could not translate host name "pg.internal" to address', 'host name "<host>" to'),
        ("host [2001:db8::1]:5432 is down", "host <address> is down"),
        ("Could not connect to https://s3.eu.example:9000/bkt", "Could not connect to <dsn>"),
        ("db.internal:5432 refused", "<host> refused"),
        ("finished at 10:03:27, wrote app.dump.zst", "finished at 10:03:27, wrote app.dump.zst"),
    ],
)
def test_errors_on_the_page_name_no_host(error: str, shown: str) -> None:
    from backupd.observe.statuspage import scrub

    assert shown in scrub(error)
