"""The read-only HTML status page served at `GET /` on the HTTP listener.

One self-contained page: no JavaScript, no external assets (it works offline
and under `Content-Security-Policy: default-src 'none'`), an inline SVG chart
per job. It renders the same per-job data as `backupd status` (see
`Daemon._status`), plus the recent backups the daemon knows of.

Everything shown is treated as hostile text: job names, storage names and
error messages (which can quote database names, server replies, file names)
are HTML-escaped, control characters replaced, and errors pass through
`scrub` so no DSN, URL, host name or address reaches the page. No config value
other than job and storage names is shown, and nothing secret.

WAL lag: physical jobs report `wal_lag_seconds` in their status entry; the
column appears only when some job has that field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from html import escape
from typing import Any

from backupd import __version__
from backupd.catalog.manifest import rfc3339
from backupd.observe.overview import human_duration, human_rate, human_size

CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s\"'<>]*")
_QUOTED_HOST = re.compile(
    r'\b(host name|host|server at|hostname|address|endpoint)(\s+)"[^"]*"', re.IGNORECASE
)
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")
_IPV6 = re.compile(
    r"\[?(?:\b(?:[0-9a-fA-F]{1,4}:){3,7}[0-9a-fA-F]{1,4}\b|[0-9a-fA-F:]*::[0-9a-fA-F:]+)\]?(?::\d+)?"
)
_HOST_PORT = re.compile(r"\b(?:[a-zA-Z0-9-]+\.)+[a-zA-Z]{2,}:\d+\b")


def scrub(text: str) -> str:
    """`text` without URLs/DSNs, quoted host names, IP addresses or `name:port`.

    Best effort over the shapes libpq, pg_dump and botocore use; a bare host
    name in free text (not quoted, no port) is not recognised.
    """
    text = _URL.sub("<dsn>", text)
    text = _QUOTED_HOST.sub(r'\1\2"<host>"', text)
    text = _IPV4.sub("<address>", text)
    text = _IPV6.sub("<address>", text)
    return _HOST_PORT.sub("<host>", text)


def _t(value: Any) -> str:
    """Any value as escaped, printable text."""
    text = "" if value is None else str(value)
    return escape("".join(c if c.isprintable() else "?" for c in text), quote=True)


def _when(stamp: Any) -> str:
    return _t(stamp[:19].replace("T", " ") + " UTC") if isinstance(stamp, str) and stamp else "-"


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1b1b;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}
.meta{color:#666;margin-bottom:1em}
table{border-collapse:collapse;background:#fff;margin-bottom:.6em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.success{color:#17692c;font-weight:600}.failure,.cancelled{color:#b00020;font-weight:600}
.running{color:#0b57d0;font-weight:600}.err{color:#b00020;max-width:40em;word-break:break-word}
.job{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}
svg{background:#fff;border:1px solid #ddd}
"""


def render(
    jobs: Sequence[dict[str, Any]], recent: dict[str, list[dict[str, Any]]], now: datetime
) -> str:
    """The page for `jobs` (status entries) and `recent` (job -> backups, newest first)."""
    has_wal = any("wal_lag_seconds" in job for job in jobs)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta http-equiv="refresh" content="30">',
        "<title>backupd status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>backupd status</h1>",
        f'<p class="meta">backupd {_t(__version__)} · {len(jobs)} job(s) · '
        f'generated <time id="generated">{_t(rfc3339(now))}</time> · read-only, '
        "refreshes every 30 s</p>",
    ]
    if not jobs:
        out.append("<p>No jobs configured.</p>")
    else:
        out.append(_jobs_table(jobs, has_wal))
    for job in jobs:
        out.append(_job_section(job, recent.get(str(job.get("name")), [])))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _jobs_table(jobs: Sequence[dict[str, Any]], has_wal: bool) -> str:
    head = ["Job", "Last result", "Finished", "Duration", "Error", "Last backup", "Next run"]
    head += ["Running"] + (["WAL lag"] if has_wal else [])
    rows = [
        '<table id="jobs"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
    ]
    for job in jobs:
        last = job.get("last_run") or {}
        state = last.get("state")
        error = job.get("last_error") if state in ("failure", "cancelled") else None
        backup = job.get("last_backup")
        stored = "-"
        if isinstance(backup, dict):
            stored = (
                f"{_t(human_size(backup.get('size_bytes')))}, "
                f"{_t(human_duration(backup.get('age_seconds')))} ago"
                + (" (partial)" if backup.get("partial") else "")
            )
        running = []
        for run in job.get("running") or []:
            if run.get("state") == "running":
                running.append(
                    f'<span class="running">{_t(human_size(run.get("bytes_done")))} at '
                    f"{_t(human_rate(run.get('rate_bytes_per_second')))}, "
                    f"{_t(human_duration(run.get('elapsed_seconds')))}</span>"
                )
            else:
                running.append(_t(run.get("state")))
        cells = [
            f'<td class="name">{_t(job.get("name"))}</td>',
            f'<td class="{_t(state or "none")}">{_t(state or "-")}</td>',
            f"<td>{_when(last.get('finished_at'))}</td>",
            f'<td class="num">{_t(human_duration(last.get("duration_seconds")))}</td>',
            f'<td class="err">{_t(scrub(error)) if error else ""}</td>',
            f'<td class="stored">{stored}</td>',
            f"<td>{_when(job.get('next_run'))}</td>",
            f"<td>{'<br>'.join(running) or '-'}</td>",
        ]
        if has_wal:
            lag = job.get("wal_lag_seconds")
            cells.append(
                f'<td class="num">{_t(human_duration(lag)) if lag is not None else ""}</td>'
            )
        rows.append(f'<tr data-job="{_t(job.get("name"))}">' + "".join(cells) + "</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _job_section(job: dict[str, Any], backups: list[dict[str, Any]]) -> str:
    name = _t(job.get("name"))
    parts = [f'<section class="job-section" data-job="{name}"><h2>{name}</h2>']
    if not backups:
        parts.append("<p>No backups known to this daemon yet.</p></section>")
        return "\n".join(parts)
    parts.append('<div class="job">')
    parts.append(chart(list(reversed(backups))))
    rows = [
        '<table class="backups"><thead><tr><th>Backup</th><th>Started</th><th>Size</th>'
        "<th>Duration</th><th>Storage</th></tr></thead><tbody>"
    ]
    for b in backups:
        rows.append(
            f"<tr><td>{_t(b.get('stem'))}{' (partial)' if b.get('partial') else ''}</td>"
            f"<td>{_when(b.get('started_at'))}</td>"
            f'<td class="num">{_t(human_size(b.get("size_bytes")))}</td>'
            f'<td class="num">{_t(human_duration(b.get("duration_seconds")))}</td>'
            f"<td>{_t(b.get('storage'))}</td></tr>"
        )
    rows.append("</tbody></table>")
    parts.append("\n".join(rows))
    parts.append("</div></section>")
    return "\n".join(parts)


def chart(backups: list[dict[str, Any]], width: int = 460, height: int = 180) -> str:
    """Bars for size (left axis) and a line for duration (right axis), oldest first."""
    sizes = [float(b.get("size_bytes") or 0) for b in backups]
    durations = [float(b.get("duration_seconds") or 0) for b in backups]
    left, right, top, bottom = 64, 56, 22, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    base = top + plot_h
    max_size = max(sizes, default=0) or 1.0
    max_dur = max(durations, default=0) or 1.0
    n = max(len(backups), 1)
    slot = plot_w / n
    bar_w = max(2.0, slot * 0.6)
    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="size and duration of the last '
        f'{len(backups)} backups">',
        f'<text x="{left}" y="14" font-size="11" fill="#4a6fa5">■ size</text>',
        f'<text x="{left + 60}" y="14" font-size="11" fill="#c0561b">— duration</text>',
        f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end">'
        f"{_t(human_size(max_size))}</text>",
        f'<text x="{left - 4}" y="{base}" font-size="10" text-anchor="end">0</text>',
        f'<text x="{left + plot_w + 4}" y="{top + 8}" font-size="10">'
        f"{_t(human_duration(max_dur))}</text>",
        f'<text x="{left + plot_w + 4}" y="{base}" font-size="10">0s</text>',
    ]
    points = []
    for i, (size, dur) in enumerate(zip(sizes, durations, strict=True)):
        x = left + slot * i + (slot - bar_w) / 2
        h = plot_h * size / max_size
        out.append(
            f'<rect class="size" x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w:.1f}" '
            f'height="{h:.1f}" fill="#4a6fa5"><title>{_t(human_size(size))}</title></rect>'
        )
        points.append(
            f"{left + slot * i + slot / 2:.1f},{top + plot_h - plot_h * dur / max_dur:.1f}"
        )
    if points:
        out.append(
            f'<polyline class="duration" points="{" ".join(points)}" fill="none" '
            'stroke="#c0561b" stroke-width="2"/>'
        )
    first, last = backups[0] if backups else {}, backups[-1] if backups else {}
    out.append(
        f'<text x="{left}" y="{height - 8}" font-size="10">{_when(first.get("started_at"))}</text>'
    )
    out.append(
        f'<text x="{left + plot_w}" y="{height - 8}" font-size="10" text-anchor="end">'
        f"{_when(last.get('started_at'))}</text>"
    )
    out.append("</svg>")
    return "\n".join(out)
