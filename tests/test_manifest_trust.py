"""Issue 12, finding 5: manifests read from storage are untrusted input.

A manifest that is not one (wrong types, an unparseable time, a key escaping
its folder, a document nested too deep or too large, a job or id other than
its key says) is skipped with a warning naming its key and a short reason,
counted in `backupd_manifests_invalid`, and never breaks `list`, `prune`,
`download`, `verify` or the daemon's start-up scan of the good backups next
to it. Retention never deletes it nor the data folder next to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from backupd.catalog.listing import scan_backups
from backupd.catalog.manifest import (
    MANIFEST_SUFFIX,
    MAX_MANIFEST_BYTES,
    FailedDatabase,
    InvalidManifest,
    Manifest,
    ObjectEntry,
    folder_for,
    rfc3339,
    stem_for,
)
from backupd.storage.filesystem import FilesystemStore
from tests import configs
from tests.configs import ConfigFile
from tests.daemon_proc import DaemonProcess
from tests.helpers import run_cli
from tests.pgcluster import free_port, wait_for

MARK = "HOSTILE"  # in every hostile value: no message may echo it
STARTED = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)


def _manifest(backup_id: str = "ab12cd34", started: datetime = STARTED) -> Manifest:
    stem = stem_for("app", started, backup_id)
    return Manifest(
        id=backup_id,
        job="app",
        kind="full",
        format="custom",
        compression="zstd:3",
        encryption=None,
        source={"type": "postgres", "name": "main", "host": "db", "server_version": "15.4"},
        tool={"name": "pg_dump", "version": "15.4"},
        started_at=rfc3339(started),
        finished_at=rfc3339(started + timedelta(seconds=5)),
        duration_seconds=5.0,
        objects=(ObjectEntry("app", f"{stem}/app.dump.zst", 10, 20, "0" * 64),),
        trigger="schedule",
        triggered_by=None,
        attempts=1,
        backupd_version="1.0",
        tables={"app": {"t": 3}},
    )


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting `path` ("a.b", list indexes as numbers) to `value`."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value

    return mutate


def _drop(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.pop(name)


# (case, mutation of a valid manifest's JSON, what the reason says)
HOSTILE: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("started_at a number", _set("started_at", 1_700_000_000), "started_at is a number"),
    ("started_at null", _set("started_at", None), "started_at is null"),
    ("started_at unparseable", _set("started_at", f"{MARK} o'clock"), "not an RFC 3339 time"),
    ("started_at naive", _set("started_at", "2026-11-20T02:00:00"), "no time zone offset"),
    ("started_at year 1", _set("started_at", "0001-01-01T00:00:00+01:00"), "outside the years"),
    ("id a list", _set("id", [MARK]), "id is a list"),
    ("id not lowercase hex", _set("id", f"{MARK}/../x"), "id is not 1-64 lowercase"),
    ("job an object", _set("job", {MARK: 1}), "job is an object"),
    ("objects an object", _set("objects", {MARK: 1}), "objects is an object"),
    ("objects empty", _set("objects", []), "objects is empty"),
    ("object a string", _set("objects.0", MARK), "objects[0] is a string"),
    ("size a string", _set("objects.0.size_bytes", MARK), "objects[0].size_bytes is a string"),
    ("size negative", _set("objects.0.size_bytes", -1), "size_bytes is out of range"),
    ("size a boolean", _set("objects.0.raw_bytes", True), "raw_bytes is a boolean"),
    ("sha256 short", _set("objects.0.sha256", MARK.lower()), "not 64 lowercase hex"),
    ("key escapes", _set("objects.0.key", f"../../../{MARK}"), "not a file in the backup's own"),
    ("key absolute", _set("objects.0.key", f"/etc/{MARK}"), "not a file in the backup's own"),
    (
        "key in its folder but ..",
        lambda d: d["objects"][0].update(key=d["objects"][0]["key"].rsplit("/", 1)[0] + "/.."),
        "not a file in the backup's own",
    ),
    ("database a number", _set("objects.0.database", 42), "objects[0].database is a number"),
    ("database empty", _set("objects.0.database", ""), "objects[0].database is empty"),
    (
        "same database twice",
        lambda d: d["objects"].append(dict(d["objects"][0])),
        "same database twice",
    ),
    ("format not a name", _set("objects.0.format", MARK), "format is not a format name"),
    ("compression unknown", _set("compression", MARK), "compression is not one backupd knows"),
    ("duration negative", _set("duration_seconds", -1.0), "duration_seconds is out of range"),
    ("attempts a string", _set("attempts", MARK), "attempts is a string"),
    ("source a list", _set("source", [MARK]), "source is a list"),
    ("tables counts a string", _set("tables.app", {"t": MARK}), "tables.<database>.<table> is a"),
    ("failed a string", _set("failed", MARK), "failed is a string"),
    ("failed entry lacks error", _set("failed", [{"database": "x"}]), "failed[0].error is missing"),
    ("format_version 2", _set("format_version", 2), "unsupported format_version"),
    ("format_version true", _set("format_version", True), "unsupported format_version"),
    ("started_at missing", _drop("started_at"), "started_at is missing"),
    ("deeply nested source", _set("source", json.loads("[" * 40 + "]" * 40)), "nested deeper"),
]


@pytest.mark.parametrize(("mutate", "reason"), [pytest.param(*c[1:], id=c[0]) for c in HOSTILE])
def test_hostile_fields_are_refused_with_a_reason_that_echoes_nothing(
    mutate: Callable[[dict[str, Any]], None], reason: str
) -> None:
    data = json.loads(_manifest().to_json())
    mutate(data)
    with pytest.raises(InvalidManifest, match=f"^.*{reason.replace('[', '.').replace(']', '.')}"):
        Manifest.from_json(json.dumps(data).encode())
    try:
        Manifest.from_json(json.dumps(data).encode())
    except InvalidManifest as exc:
        assert MARK not in str(exc) and MARK.lower() not in str(exc)
        assert len(str(exc)) < 120


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b"[" * 200_000 + b"]" * 200_000, "nested deeper", id="nested 200,000 deep"),
        pytest.param(b'{"format_version": 1, "x": ' + b"[" * 100_000, "nested", id="unclosed"),
        pytest.param(f"{MARK}{{".encode(), "not valid JSON", id="not JSON"),
        pytest.param(b'{"format_version": NaN}', "NaN", id="NaN"),
        pytest.param(b'{"id": "a", "id": "b"}', "same key twice", id="duplicate key"),
        pytest.param(b"\xff\xfe{}", "not UTF-8", id="not UTF-8"),
        pytest.param(b'"' + b"9" * 100 + b'"', "not a JSON object", id="a string"),
        pytest.param(
            b'{"pad": "' + b"x" * MAX_MANIFEST_BYTES + b'"}', "larger than", id="over 1 MiB"
        ),
    ],
)
def test_hostile_documents_are_refused(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidManifest, match=reason):
        Manifest.from_json(raw)


def test_a_number_too_large_for_a_float_is_out_of_range() -> None:
    raw = _manifest().to_json().replace(b'"duration_seconds": 5.0', b'"duration_seconds": 1e999')
    with pytest.raises(InvalidManifest, match="duration_seconds is out of range"):
        Manifest.from_json(raw)


def test_a_manifest_must_be_stored_under_its_own_key() -> None:
    good = _manifest()
    assert Manifest.from_json(good.to_json(), good.manifest_key) == good
    for other in (
        replace(good, job="other"),
        replace(good, id="ffff0000"),
        replace(good, started_at=rfc3339(STARTED + timedelta(seconds=1))),
    ):
        stem = other.stem
        moved = replace(other, objects=(replace(other.objects[0], key=f"{stem}/app.dump.zst"),))
        assert Manifest.from_json(moved.to_json()) == moved  # valid, but not at this key
        with pytest.raises(InvalidManifest, match="do not give the key it is stored at"):
            Manifest.from_json(moved.to_json(), good.manifest_key)


def test_failed_databases_round_trip_and_unknown_fields_are_ignored() -> None:
    partial = replace(
        _manifest(), failed=(FailedDatabase("billing", "pg_dump exited 1: permission denied"),)
    )
    data = json.loads(partial.to_json())
    assert data["failed"] == [
        {"database": "billing", "error": "pg_dump exited 1: permission denied"}
    ]
    data |= {"storage": "local", "future": False, "later": "x"}  # list --json, later fields
    assert Manifest.from_json(json.dumps(data).encode()) == partial
    # A manifest written before `failed` existed is a complete backup.
    del data["failed"]
    assert Manifest.from_json(json.dumps(data).encode()).failed == ()


# -- against real storage and real `backupd` processes -------------------------------------


def _hostile_objects(base: dict[str, Any], when: datetime) -> Iterator[tuple[str, str, bytes]]:
    """(case, key, bytes) of hostile manifests, each under a key of backupd's layout.

    `base` is a real manifest (from `list --json`); each case gets its own id and
    start time, the key they give, and then its damage.
    """
    cases: list[tuple[str, Callable[[dict[str, Any]], None] | bytes]] = [
        ("started_at a number", _set("started_at", 1_700_000_000)),
        ("started_at null", _set("started_at", None)),
        ("id a list", _set("id", [MARK])),
        ("unparseable time", _set("started_at", MARK)),
        ("objects an object", _set("objects", {MARK: 1})),
        ("size a string", _set("objects.0.size_bytes", MARK)),
        ("sha256 not hex", _set("objects.0.sha256", MARK * 8)),
        ("key escapes", _set("objects.0.key", f"../../../../{MARK}")),
        ("key absolute", _set("objects.0.key", f"/etc/{MARK}")),
        ("database a number", _set("objects.0.database", 42)),
        ("claims another job", _set("job", "other")),
        ("claims another id", _set("id", "ffffffff")),
        ("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000),
        ("2 MiB", b'{"pad": "' + b"x" * (2 * MAX_MANIFEST_BYTES) + b'"}'),
        ("not JSON", f"{MARK}{{{{".encode()),
        ("failed a string", _set("failed", MARK)),
    ]
    for n, (case, damage) in enumerate(cases):
        started = when + timedelta(seconds=n)
        backup_id = f"bad{n:05x}"
        stem = stem_for("app", started, backup_id)
        data = json.loads(json.dumps(base))
        data.pop("storage", None)
        data.pop("future", None)
        data |= {"id": backup_id, "stem": stem, "started_at": rfc3339(started)}
        for entry in data["objects"]:
            entry["key"] = f"{stem}/{entry['key'].rsplit('/', 1)[-1]}"
        if isinstance(damage, bytes):
            raw = damage
        else:
            damage(data)
            raw = json.dumps(data).encode()
        yield case, f"{folder_for('app', started)}{stem}{MANIFEST_SUFFIX}", raw


def _fs_keys(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _s3_keys(s3_client: Any, bucket: str) -> set[str]:
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"].removeprefix("prod/") for page in pages for o in page.get("Contents", [])}


def _samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.slow
def test_hostile_manifests_next_to_good_backups_break_no_command(
    tmp_path: Path,
    config_file: ConfigFile,
    sample_db: str,
    s3_bucket: str,
    s3_client: Any,
    record_testsuite_property: Callable[[str, object], None],
) -> None:
    fs = tmp_path / "store"
    port = free_port()
    cfg = config_file(
        sample_db,
        path=tmp_path / "backupd.toml",
        s3=True,
        extra_job={"retention": {"keep_last": 10}},
        http_listen=f"127.0.0.1:{port}",
    )
    c = ("-c", str(cfg))
    for _ in range(2):
        out = run_cli("backup", "app", *c)
        assert out.returncode == 0, out.stderr
    listed = run_cli("list", "app", *c, "--json")
    assert listed.returncode == 0, listed.stderr
    older, newer = sorted(json.loads(listed.stdout), key=lambda m: m["started_at"])

    # Sixteen hostile manifests in each storage, the first one with a data folder.
    hostile = list(_hostile_objects(newer, datetime.now(UTC) - timedelta(hours=1)))
    bad_keys = {key for _, key, _ in hostile}
    bad_data = hostile[0][1].removesuffix(MANIFEST_SUFFIX) + f"/{sample_db}.dump.zst"
    for _, key, raw in hostile:
        (fs / key).parent.mkdir(parents=True, exist_ok=True)
        (fs / key).write_bytes(raw)
        s3_client.put_object(Bucket=s3_bucket, Key="prod/" + key, Body=raw)
    (fs / bad_data).parent.mkdir(parents=True, exist_ok=True)
    (fs / bad_data).write_bytes(b"data of a backup whose manifest is invalid")
    s3_client.put_object(Bucket=s3_bucket, Key="prod/" + bad_data, Body=b"data")
    n_bad = len(hostile)

    # list: the good backups, each bad one named on stderr with its reason, nothing echoed.
    for storage in ("local", "offsite"):
        began = time.perf_counter()
        out = run_cli("list", "app", *c, "--storage", storage)
        record_testsuite_property(f"list_{storage}_seconds", round(time.perf_counter() - began, 3))
        assert out.returncode == 0, out.stderr
        assert older["id"] in out.stdout and newer["id"] in out.stdout
        assert "bad0" not in out.stdout
        skipped = [line for line in out.stderr.splitlines() if "skipped invalid manifest" in line]
        assert len(skipped) == n_bad
        assert all(key in out.stderr for key in bad_keys)
        assert MARK not in out.stderr and MARK.lower() not in out.stderr
        out = run_cli("list", "app", *c, "--storage", storage, "--json")
        assert out.returncode == 0, out.stderr
        assert [m["id"] for m in json.loads(out.stdout)] == [newer["id"], older["id"]]
        assert [m["future"] for m in json.loads(out.stdout)] == [False, False]

        # download and verify of the good backups, latest and by id.
        for which in ("latest", older["id"]):
            dump = tmp_path / f"{storage}-{which}.dump"
            out = run_cli("download", "app", *c, "--storage", storage, "--backup", which,
                          "-o", str(dump))  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert dump.stat().st_size == newer["objects"][0]["raw_bytes"] or which != "latest"
            out = run_cli("verify", "app", *c, "--storage", storage, "--backup", which)
            assert out.returncode == 0, out.stdout + out.stderr
        # Asking for a bad one by id says what is wrong with it.
        out = run_cli("verify", "app", *c, "--storage", storage, "--backup", "bad00000")
        assert out.returncode == 1
        assert "its manifest" in out.stderr and "started_at is a number" in out.stderr

    # The daemon's start-up scan reports the good backups and counts the bad ones.
    daemon = DaemonProcess(cfg, tmp_path / "daemon.log").start()
    try:

        def scanned() -> dict[Any, float] | None:
            s = _samples(port)
            key = (
                "backupd_manifests_invalid",
                frozenset({"job": "app", "storage": "offsite"}.items()),
            )
            return s if key in s else None

        s = wait_for(scanned, 30, what="the start-up scan")
        for storage in ("local", "offsite"):
            labels = frozenset({"job": "app", "storage": storage}.items())
            assert s[("backupd_manifests_invalid", labels)] == n_bad
            assert s[("backupd_backups", labels)] == 2
        finished = datetime.fromisoformat(newer["finished_at"].replace("Z", "+00:00"))
        last = s[("backupd_job_last_success_timestamp_seconds", frozenset({"job": "app"}.items()))]
        assert last == pytest.approx(finished.timestamp(), abs=1e-3)
    finally:
        assert daemon.stop() == 0
    assert "Traceback" not in daemon.logs() and MARK not in daemon.logs()
    warned = {e["key"] for e in daemon.events() if e.get("event") == "manifest_invalid"}
    assert warned == bad_keys

    # prune: keep_last = 1 deletes the older good backup, and nothing of the bad ones.
    configs.edit(cfg, {"job.app.retention.keep_last": 1})
    out = run_cli("prune", "app", *c)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("INVALID") == 2 * n_bad
    assert f"deleted       {older['stem']}" in out.stdout
    for keys in (_fs_keys(fs), _s3_keys(s3_client, s3_bucket)):
        assert bad_keys | {bad_data} <= keys
        assert not any(older["stem"] in key for key in keys)
        assert any(newer["stem"] in key for key in keys)
    record_testsuite_property("hostile_manifests_skipped_per_storage", n_bad)


async def test_listing_time_with_many_bad_manifests(
    tmp_path: Path, record_testsuite_property: Callable[[str, object], None]
) -> None:
    """List 500 good and 100 bad manifests of one job in a filesystem store."""
    from backupd.config.model import FilesystemStorage

    store = FilesystemStore(FilesystemStorage(name="local", path=str(tmp_path / "store")))
    root = tmp_path / "store"
    base = json.loads(_manifest().to_json())
    start = datetime(2026, 1, 1, tzinfo=UTC)
    good = 500
    for n in range(good):
        m = _manifest(f"{n:08x}", start + timedelta(hours=n))
        (root / m.manifest_key).parent.mkdir(parents=True, exist_ok=True)
        (root / m.manifest_key).write_bytes(m.to_json())
    bad = 0
    for _, key, raw in _hostile_objects(base, start + timedelta(days=30)):
        for copy in range(7):  # 16 cases x 7 copies: 112 bad manifests
            shifted = key.replace("-bad", f"-b{copy}d")
            (root / shifted).parent.mkdir(parents=True, exist_ok=True)
            (root / shifted).write_bytes(raw)
            bad += 1

    await store.open()
    began = time.perf_counter()
    try:
        listing = await scan_backups(store, "app")
    finally:
        await store.aclose()
    elapsed = time.perf_counter() - began
    assert len(listing.backups) == good and len(listing.invalid) == bad
    record_testsuite_property("list_500_good_112_bad_seconds", round(elapsed, 3))
    print(f"listed {good} good + {bad} bad manifests in {elapsed:.3f}s")
