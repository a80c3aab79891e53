"""Running contenders and measuring them: wall time, CPU time, peak RSS.

Every contender is one child process (a `backupd` command, or `bash -c` for a
shell pipeline) started under GNU `/usr/bin/time -v`. Wall time is
`perf_counter` around it; CPU time comes from `os.wait4` and covers the child
and the descendants it reaped (pg_dump, zstd, ...), not the PostgreSQL server.
Peak RSS is GNU time's "Maximum resident set size": the largest process of the
tree. (`wait4`'s own ru_maxrss is no good here: a child forked from this
process starts with this process's high-water mark, moto's objects included.)
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TIME_BIN = "/usr/bin/time"


class BenchError(RuntimeError):
    """A contender failed: the benchmark stops instead of timing a failure."""


@dataclass(frozen=True, slots=True)
class Sample:
    wall: float  # seconds
    cpu: float  # user + system seconds of the process tree (server excluded)
    max_rss_kb: int  # largest resident set in the tree (GNU time's figure)


def run(argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None) -> Sample:
    """Run one contender to completion; raise BenchError (with its output) if it fails."""
    if not os.access(TIME_BIN, os.X_OK):
        raise BenchError(f"{TIME_BIN} is missing: apt-get install -y time")
    time_out = log.with_suffix(".time")
    argv = [TIME_BIN, "-v", "-o", str(time_out), *argv]
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise BenchError(f"{' '.join(argv)[:300]} exited {proc.returncode}:\n{tail}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_out.read_text())
    if match is None:
        raise BenchError(f"no peak RSS in {time_out}")
    return Sample(wall, usage.ru_utime + usage.ru_stime, int(match.group(1)))


def shell(pipeline: str) -> list[str]:
    """A shell pipeline that fails if any stage fails."""
    return ["bash", "-c", f"set -euo pipefail; {pipeline}"]


@dataclass
class Contender:
    """One way of doing the job; `prepare` and `cleanup` run untimed around each run."""

    name: str
    argv: Callable[[], list[str]]
    env: dict[str, str] | None = None
    prepare: Callable[[], None] = lambda: None
    cleanup: Callable[[], None] = lambda: None
    samples: list[Sample] = field(default_factory=list)


def alternate(
    contenders: Sequence[Contender],
    repeat: int,
    logdir: Path,
    progress: Callable[[str], None],
) -> None:
    """Run every contender `repeat` times, interleaved (A B C, B C A, ...): drifting
    machine load then hits each contender alike instead of whichever ran last."""
    logdir.mkdir(parents=True, exist_ok=True)
    n = len(contenders)
    for r in range(repeat):
        for c in [*contenders[r % n :], *contenders[: r % n]]:
            c.prepare()
            slug = re.sub(r"[^a-z0-9]+", "-", c.name.lower()).strip("-")[:60]
            sample = run(c.argv(), log=logdir / f"{slug}-{r}.log", env=c.env)
            c.cleanup()
            c.samples.append(sample)
            progress(
                f"  [{r + 1}/{repeat}] {c.name}: {sample.wall:.2f}s wall, {sample.cpu:.2f}s cpu, "
                f"{sample.max_rss_kb * 1024 / 1e6:.0f} MB peak RSS"
            )


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def empty_dir(path: Path) -> None:
    """Remove everything under `path`, keep `path`."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
