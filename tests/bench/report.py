"""The benchmark's results: one table of medians, the targets, and a JSON file."""

from __future__ import annotations

import json
import operator
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.measure import Contender


@dataclass
class Row:
    suite: str
    name: str
    unit: str  # "s", "ms", "%", "MB"
    values: list[float]
    cpu: list[float] = field(default_factory=list)  # seconds, timed contenders only
    rss_mb: list[float] = field(default_factory=list)  # peak RSS, MB (10^6 bytes)

    @property
    def median(self) -> float:
        return statistics.median(self.values)


@dataclass
class Target:
    label: str
    value: float
    op: str  # "<=", ">=", "<"
    limit: float
    unit: str  # "x", "s", "%", "ms", "MB"

    @property
    def ok(self) -> bool:
        compare: Callable[[float, float], bool] = {
            "<=": operator.le,
            ">=": operator.ge,
            "<": operator.lt,
        }[self.op]
        return compare(self.value, self.limit)


@dataclass
class Results:
    header: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_timed(self, suite: str, contenders: Sequence[Contender]) -> dict[str, Row]:
        rows = {}
        for c in contenders:
            row = Row(
                suite,
                c.name,
                "s",
                [s.wall for s in c.samples],
                [s.cpu for s in c.samples],
                [s.max_rss_kb * 1024 / 1e6 for s in c.samples],
            )
            self.rows.append(row)
            rows[c.name] = row
        return rows

    def add(self, suite: str, name: str, unit: str, values: Sequence[float]) -> Row:
        row = Row(suite, name, unit, list(values))
        self.rows.append(row)
        return row

    def target(self, label: str, value: float, op: str, limit: float, unit: str) -> Target:
        t = Target(label, value, op, limit, unit)
        self.targets.append(t)
        return t

    # -- output ----------------------------------------------------------------------

    def table(self) -> str:
        h = self.header
        lines = [
            f"backupd benchmark {h['started_at']}  scale {h['scale']}  repeat {h['repeat']}  "
            f"{h['cpus']} CPUs  load {h['load_before']} -> {h.get('load_after', '?')}",
            f"dataset {h.get('dataset', '?')}",
            f"tools: {h.get('tools', '?')}",
            f"backupd: {h.get('backupd', '?')}",
            "",
        ]
        cells = [("suite", "contender / measure", "median", "runs", "cpu (med)", "peak RSS")]
        for r in self.rows:
            cells.append(
                (
                    r.suite,
                    r.name,
                    _fmt(r.median, r.unit),
                    _runs(r),
                    f"{statistics.median(r.cpu):.2f} s" if r.cpu else "",
                    f"{statistics.median(r.rss_mb):.0f} MB" if r.rss_mb else "",
                )
            )
        lines += _grid(cells)
        lines += ["", "targets"]
        tcells = [("", "measured", "target", "")]
        for t in self.targets:
            tcells.append(
                (
                    t.label,
                    _fmt(t.value, t.unit),
                    f"{t.op} {_fmt(t.limit, t.unit)}",
                    "PASS" if t.ok else "MISS",
                )
            )
        lines += _grid(tcells)
        if self.notes:
            lines += ["", "notes"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)

    def write_json(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        stamp = self.header["started_at"].replace(":", "").replace("-", "")
        path = directory / f"bench-{stamp}.json"
        data = {
            "header": self.header,
            "rows": [asdict(r) | {"median": r.median} for r in self.rows],
            "targets": [asdict(t) | {"ok": t.ok} for t in self.targets],
            "notes": self.notes,
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        (directory / "latest.json").write_text(path.read_text())
        return path


def _runs(row: Row) -> str:
    """Every run's value, or the range when there are many (latency samples)."""
    if len(row.values) <= 6:
        return " ".join(_num(v, row.unit) for v in row.values)
    low, high = _num(min(row.values), row.unit), _num(max(row.values), row.unit)
    return f"n={len(row.values)}: {low} .. {high}"


def _num(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.2f}"
    if unit in ("ms", "%"):
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    if unit == "x":
        return f"{value:.2f}"
    return f"{value:.0f}"


def _fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{_num(value, unit)} %"
    return f"{_num(value, unit)} {unit}"


def _grid(cells: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
