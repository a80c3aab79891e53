"""The Prometheus text format (0.0.4), written fast enough for a thousand jobs.

prometheus_client's `generate_latest` builds a `Sample` and formats its labels
for every line of every scrape: ~190 ms for the ~29,000 lines of a daemon with
1,000 jobs, on the event loop. Here the part of a line before its value
(`name{labels} `) is built once per series and kept, so a scrape is a walk
over the metrics' children that formats numbers: the same bytes in ~35 ms,
gzip included (`make bench`; README "Performance" has the last figures).

Counters, gauges and histograms with labels take this path; everything else
(label-less metrics, the process collector) is formatted by `generate_latest`
itself. The children are read through prometheus_client attributes that are
not public API (`_metrics`, `_value`, `_buckets`, `_sum`); the version is
pinned in constraints.txt, and a test checks the output byte for byte against
`generate_latest`, so an upgrade that changes them fails the suite instead of
a scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

from prometheus_client import Counter, Gauge, Histogram, generate_latest, utils
from prometheus_client.registry import Collector

# Go's float formatting, as Prometheus clients write sample values ("1e+06", "+Inf").
_go_float = cast(Callable[[float], str], utils.floatToGoString)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_Key = tuple[str, tuple[str, ...]]  # (metric name, label values)


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{_escape_value(v)}"' for k, v in sorted(pairs))


class _Only:
    """One collector seen as a registry, for `generate_latest`."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def collect(self) -> Iterator[Any]:
        return iter(self._collector.collect())


class TextExposition:
    """Renders `collectors` (in this order) as `generate_latest` would render a
    registry holding exactly them."""

    def __init__(self, collectors: Sequence[Collector]) -> None:
        self._collectors = list(collectors)
        # Per series: the line prefixes, e.g. ['backupd_job_running{job="a"} ']; a
        # histogram has one per bucket, then _count and _sum.
        self._prefixes: dict[_Key, list[str]] = {}
        self._values: dict[float, str] = {}

    def render(self) -> bytes:
        out: list[str] = []
        prefixes: dict[_Key, list[str]] = {}  # this scrape's: removed series drop out
        for collector in self._collectors:
            if isinstance(collector, Counter | Gauge | Histogram) and collector._labelnames:
                self._family(collector, out, prefixes)
            else:
                out.append(generate_latest(_Only(collector)).decode())
        self._prefixes = prefixes
        if len(self._values) > 10_000:  # timestamps and sizes are mostly unique
            self._values.clear()
        return "".join(out).encode()

    def _format(self, value: float) -> str:
        text = self._values.get(value)
        if text is None:
            text = self._values[value] = _go_float(value)
        return text

    def _family(
        self, metric: Counter | Gauge | Histogram, out: list[str], prefixes: dict[_Key, list[str]]
    ) -> None:
        name, kind = metric._name, metric._type
        shown = name + "_total" if kind == "counter" else name
        out.append(f"# HELP {shown} {_escape_help(metric._documentation)}\n")
        out.append(f"# TYPE {shown} {kind}\n")
        with metric._lock:
            children: list[tuple[Any, Any]] = list(metric._metrics.items())
        fmt, histogram = self._format, isinstance(metric, Histogram)
        for values, child in children:
            key = (name, values)
            lines = self._prefixes.get(key) or self._series(metric, values)
            prefixes[key] = lines
            if histogram:
                acc = 0.0
                for prefix, bucket in zip(lines, child._buckets, strict=False):
                    acc += bucket.get()
                    out.append(f"{prefix}{fmt(acc)}\n")
                out.append(f"{lines[-2]}{fmt(acc)}\n")
                out.append(f"{lines[-1]}{fmt(child._sum.get())}\n")
            else:
                out.append(f"{lines[0]}{fmt(child._value.get())}\n")

    @staticmethod
    def _series(metric: Counter | Gauge | Histogram, values: tuple[str, ...]) -> list[str]:
        pairs = list(zip(metric._labelnames, values, strict=True))
        name = metric._name
        if isinstance(metric, Histogram):
            buckets = [
                f"{name}_bucket{{{_labels([*pairs, ('le', _go_float(bound))])}}} "
                for bound in metric._upper_bounds
            ]
            labels = _labels(pairs)
            return [*buckets, f"{name}_count{{{labels}}} ", f"{name}_sum{{{labels}}} "]
        shown = name + "_total" if isinstance(metric, Counter) else name
        return [f"{shown}{{{_labels(pairs)}}} "]
