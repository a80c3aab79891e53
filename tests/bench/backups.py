"""Backup and restore contenders: backupd against the shell pipelines it replaces.

Each suite builds its contenders, runs them alternating (see `measure.alternate`)
and records medians and the targets of issue 7. Outputs are deleted after every
run (untimed), so each run writes into the same empty place.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.bench import dataset
from tests.bench.measure import Contender, alternate, empty_dir, run, shell
from tests.bench.report import Results
from tests.pgcluster import PgCluster

BACKUPD = str(Path(sys.executable).parent / "backupd")
# The boto3 contender's part size and concurrency: what the issue measured against
# (backupd's old default). backupd runs with its defaults: 5 MiB parts growing, x4.
PART_SIZE_MIB = 16
UPLOAD_CONCURRENCY = 4
AWS_KEY, AWS_SECRET = "bench", "bench-secret"
PG_DUMP = dataset.pg_tool("pg_dump")  # the binary itself, not Debian's perl pg_wrapper
PG_RESTORE = dataset.pg_tool("pg_restore")

# The boto3 contender: stdin to one object through upload_fileobj's multipart transfer.
BOTO3_UPLOAD = """
import sys, boto3
from boto3.s3.transfer import TransferConfig
part = int(sys.argv[4]) * 1024 * 1024
cfg = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                     max_concurrency=int(sys.argv[5]), use_threads=True)
# Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (Setup.pg_env).
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
s3.upload_fileobj(sys.stdin.buffer, sys.argv[2], sys.argv[3], Config=cfg)
"""


@dataclass
class Setup:
    """What every suite needs: the cluster, the dataset, a scratch directory."""

    pg: PgCluster
    database: str
    work: Path
    repeat: int
    progress: Callable[[str], None]
    backupd: str = BACKUPD  # the command under test (another build: --backupd)
    s3_endpoint: str = ""
    bucket: str = "bench"
    s3_store: str = "moto"  # which store s3_endpoint is: moto, or rgw (Ceph, tests/objstores.py)
    s3_key: str = AWS_KEY
    s3_secret: str = AWS_SECRET

    @property
    def pg_env(self) -> dict[str, str]:
        return dataset.pg_env(self.pg) | {
            "AWS_ACCESS_KEY_ID": self.s3_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def pg_args(self, database: str | None = None) -> str:
        return f"-h 127.0.0.1 -p {self.pg.port} -U {self.pg.user} {database or self.database}"

    def config(self, name: str, database: str | None = None) -> Path:
        """A backupd config with jobs `fs` (filesystem) and, with S3 up, `s3`; zstd:3."""
        path = self.work / f"{name}.toml"
        pwfile = self.work / "pg-password"
        pwfile.write_text(self.pg.password + "\n")
        pwfile.chmod(0o600)
        s3 = ""
        if self.s3_endpoint:
            s3 = f"""
                [storage.s3]
                type = "s3"
                bucket = "{self.bucket}"
                prefix = "backupd/"
                endpoint_url = "{self.s3_endpoint}"
                region = "us-east-1"
                access_key_id = {{ env = "AWS_ACCESS_KEY_ID" }}
                secret_access_key = {{ env = "AWS_SECRET_ACCESS_KEY" }}
                addressing_style = "path"

                [job.s3]
                source = "main"
                storage = ["s3"]
                compression = "zstd:3"
                """
        path.write_text(
            textwrap.dedent(f"""\
            [daemon]
            socket = "{self.work}/{name}.sock"
            http_listen = ""
            log_level = "warning"

            [source.main]
            type = "postgres"
            dsn = "{self.pg.dsn(database or self.database)}"
            password = {{ file = "{pwfile}" }}

            [storage.fs]
            type = "filesystem"
            path = "{self.work}/{name}-fs"

            [job.fs]
            source = "main"
            storage = ["fs"]
            compression = "zstd:3"
            """)
            + textwrap.dedent(s3)
        )
        return path


def warm_up(setup: Setup) -> int:
    """Bytecode compiled and one untimed dump (the table files in the page cache, as
    for every later run); returns the size of the uncompressed custom-format dump."""
    package = Path(__file__).resolve().parents[2] / "backupd"
    run([sys.executable, "-m", "compileall", "-q", str(package)], log=setup.work / "compile.log")
    size_file = setup.work / "raw-dump-bytes"
    run(
        shell(f"{PG_DUMP} -Fc -Z0 {setup.pg_args()} | wc -c > {size_file}"),
        log=setup.work / "warm-up.log",
        env=setup.pg_env,
    )
    return int(size_file.read_text())


def filesystem_suite(setup: Setup, results: Results) -> None:
    cfg = setup.config("fs")
    store = setup.work / "fs-fs"
    out = setup.work / "out"
    out.mkdir(exist_ok=True)
    contenders = [
        Contender(
            "backupd backup -> filesystem (zstd:3)",
            lambda: [setup.backupd, "backup", "fs", "-c", str(cfg)],
            env=setup.pg_env,
            prepare=lambda: empty_dir(store),
        ),
        Contender(
            "pg_dump -Fc -Z0 | zstd -3 > file",
            lambda: shell(f"{PG_DUMP} -Fc -Z0 {setup.pg_args()} | zstd -3 -q > {out}/dump.zst"),
            env=setup.pg_env,
            cleanup=lambda: (out / "dump.zst").unlink(),
        ),
        Contender(
            "pg_dump -Fc > file (built-in gzip)",
            lambda: shell(f"{PG_DUMP} -Fc {setup.pg_args()} > {out}/dump.fc"),
            env=setup.pg_env,
            cleanup=lambda: (out / "dump.fc").unlink(),
        ),
    ]
    setup.progress("filesystem store: backupd vs pg_dump | zstd vs pg_dump -Fc")
    alternate(contenders, setup.repeat, setup.work / "logs" / "fs", setup.progress)
    rows = results.add_timed("fs", contenders)
    ours, zstd, fc = (rows[c.name].median for c in contenders)
    results.target("fs: backupd / (pg_dump | zstd -3)", ours / zstd, "<=", 1.10, "x")
    results.target("fs: (pg_dump -Fc) / backupd", fc / ours, ">=", 3.0, "x")


def s3_suite(setup: Setup, results: Results) -> None:
    import boto3  # type: ignore[import-untyped]

    client = boto3.client(
        "s3",
        endpoint_url=setup.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=setup.s3_key,
        aws_secret_access_key=setup.s3_secret,
    )
    client.create_bucket(Bucket=setup.bucket)

    def empty_bucket() -> None:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=setup.bucket):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=setup.bucket, Key=obj["Key"])

    suite = "s3" if setup.s3_store == "moto" else f"s3-{setup.s3_store}"
    cfg = setup.config(suite)
    script = setup.work / "boto3_upload.py"
    script.write_text(BOTO3_UPLOAD)

    def pair(config: Path, database: str, label: str = "") -> list[Contender]:
        return [
            Contender(
                f"backupd backup -> S3 (zstd:3, default parts){label}",
                lambda: [setup.backupd, "backup", "s3", "-c", str(config)],
                env=setup.pg_env,
                cleanup=empty_bucket,
            ),
            Contender(
                f"pg_dump -Fc -Z0 | zstd -3 | boto3 ({PART_SIZE_MIB} MiB x{UPLOAD_CONCURRENCY})"
                + label,
                lambda: shell(
                    f"{PG_DUMP} -Fc -Z0 {setup.pg_args(database)} | zstd -3 -q | "
                    f"{sys.executable} {script} {setup.s3_endpoint} {setup.bucket} "
                    f"shell/{uuid.uuid4().hex}.dump.zst {PART_SIZE_MIB} {UPLOAD_CONCURRENCY}"
                ),
                env=setup.pg_env,
                cleanup=empty_bucket,
            ),
        ]

    # A store just started is slow on its first writes (RGW: a fresh OSD, 2-4 s more on
    # the first run): one untimed backup first, like the warm-up dump of every suite.
    setup.progress(f"{suite}: one untimed backup (warm-up)")
    run(
        [setup.backupd, "backup", "s3", "-c", str(cfg)],
        log=setup.work / f"{suite}-warm-up.log",
        env=setup.pg_env,
    )
    empty_bucket()
    contenders = pair(cfg, setup.database)
    setup.progress(f"S3 store ({setup.s3_store}): backupd vs pg_dump | zstd | boto3")
    alternate(contenders, setup.repeat, setup.work / "logs" / suite, setup.progress)
    rows = results.add_timed(suite, contenders)
    ours, boto = (rows[c.name] for c in contenders)
    # The fixed cost of each (start-up, connections, the requests of a backup of nothing):
    # an empty database (`postgres`), 3x the runs (they are short and vary as much).
    empty = pair(setup.config(f"{suite}-empty", "postgres"), "postgres", ", empty database")
    setup.progress(f"S3 store ({setup.s3_store}): the same for an empty database (fixed cost)")
    alternate(empty, 3 * setup.repeat, setup.work / "logs" / f"{suite}-empty", setup.progress)
    fixed = results.add_timed(suite, empty)
    ours_fixed, boto_fixed = (fixed[c.name] for c in empty)
    results.notes.append(
        f"{suite}: fixed cost (empty database) backupd {ours_fixed.median:.2f} s, boto3 "
        f"pipeline {boto_fixed.median:.2f} s: {ours_fixed.median - boto_fixed.median:+.2f} s of "
        f"the {ours.median - boto.median:+.2f} s between them on the dataset"
    )
    # issue 14's targets, on moto and on a real store (RGW)
    results.target(
        f"{suite}: backupd / (pg_dump | zstd | boto3)", ours.median / boto.median, "<=", 1.05, "x"
    )
    results.target(f"{suite}: peak RSS of backupd backup", max(ours.rss_mb), "<=", 100, "MB")


def restore_suite(setup: Setup, results: Results) -> None:
    cfg = setup.config("restore")
    out = setup.work / "out"
    out.mkdir(exist_ok=True)
    setup.progress("restore: making one backup each way (untimed)")
    empty_dir(setup.work / "restore-fs")
    run(
        [setup.backupd, "backup", "fs", "-c", str(cfg)],
        log=setup.work / "restore-backup.log",
        env=setup.pg_env,
    )
    run(
        shell(f"{PG_DUMP} -Fc -Z0 {setup.pg_args()} | zstd -3 -q > {out}/restore.zst"),
        log=setup.work / "restore-dump.log",
        env=setup.pg_env,
    )
    target = "bench_restore"

    def fresh() -> None:
        setup.pg.dropdb(target)
        setup.pg.createdb(target)

    def drop() -> None:
        setup.pg.dropdb(target)

    contenders = [
        Contender(
            "backupd restore (filesystem, zstd:3)",
            lambda: [setup.backupd, "restore", "fs", "-c", str(cfg), "--to", setup.pg.dsn(target)],
            env=setup.pg_env,
            prepare=fresh,
            cleanup=drop,
        ),
        Contender(
            "zstd -dc file | pg_restore -d NEW",
            lambda: shell(f"zstd -dc {out}/restore.zst | {PG_RESTORE} -d {setup.pg.dsn(target)}"),
            env=setup.pg_env,
            prepare=fresh,
            cleanup=drop,
        ),
    ]
    setup.progress("restore into a fresh database: backupd vs zstd -dc | pg_restore")
    alternate(contenders, setup.repeat, setup.work / "logs" / "restore", setup.progress)
    rows = results.add_timed("restore", contenders)
    ours, shell_ = (rows[c.name].median for c in contenders)
    results.target("restore: backupd / (zstd -dc | pg_restore)", ours / shell_, "<=", 1.15, "x")


def rss_suite(
    setup: Setup, results: Results, small_db: str, small_scale: float, big_scale: float
) -> None:
    """Peak RSS of `backupd backup` (filesystem, zstd:3) at two dataset sizes.

    The big scale reuses the filesystem suite's runs when it ran (same command).
    """
    big = next((r for r in results.rows if r.suite == "fs" and r.name.startswith("backupd")), None)
    sizes: dict[float, list[float]] = {}
    for scale, database in ((small_scale, small_db), (big_scale, setup.database)):
        if scale == big_scale and big is not None:
            sizes[scale] = big.rss_mb
            continue
        cfg = setup.config(f"rss-{dataset.db_name(scale)}", database)
        store = setup.work / f"rss-{dataset.db_name(scale)}-fs"
        contender = Contender(
            f"backupd backup, scale {scale:g}",
            lambda cfg=cfg: [setup.backupd, "backup", "fs", "-c", str(cfg)],  # type: ignore[misc]
            env=setup.pg_env,
            prepare=lambda store=store: empty_dir(store),  # type: ignore[misc]
        )
        setup.progress(f"peak RSS of backupd backup at scale {scale:g} ({database})")
        alternate([contender], setup.repeat, setup.work / "logs" / "rss", setup.progress)
        sizes[scale] = [s.max_rss_kb * 1024 / 1e6 for s in contender.samples]
    small_row = results.add(
        "rss", f"backupd backup peak RSS, scale {small_scale:g}", "MB", sizes[small_scale]
    )
    big_row = results.add(
        "rss", f"backupd backup peak RSS, scale {big_scale:g}", "MB", sizes[big_scale]
    )
    peak = max(small_row.median, big_row.median)
    growth = (big_row.median / small_row.median - 1) * 100
    results.target("rss: peak RSS of backupd backup", peak, "<=", 120, "MB")
    results.target(
        f"rss: growth from scale {small_scale:g} to {big_scale:g}", abs(growth), "<=", 10, "%"
    )
