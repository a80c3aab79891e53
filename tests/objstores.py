"""Real S3-compatible stores on loopback for the tests: Ceph RGW 16.2 and Swift 2.30 (s3api).

Both run from their Debian packages (`make deps-system` installs them), as
child processes of the test session, with all their state in one temporary
directory and nothing outside the machine:

- Ceph: one monitor, one BlueStore OSD on a sparse file, no cephx, and
  radosgw serving http and https (a server certificate for 127.0.0.1 signed
  by a private CA made here with openssl);
- Swift: account, container and object servers on one ring device, and a
  proxy with s3api and tempauth (which needs memcached).

A store that cannot start raises `StoreStartError` with the tail of its log:
the tests that need it fail, they are never skipped.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "backupd-test"
SECRET_KEY = "backupd-test-secret-key"
SWIFT_ACCOUNT, SWIFT_USER = "backupd", "tester"

REQUIRED = {
    "rgw": ["ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph", "uuidgen"],
    "swift": [
        "swift-proxy-server",
        "swift-account-server",
        "swift-container-server",
        "swift-object-server",
        "swift-ring-builder",
        "memcached",
    ],
}


# The proxy pipeline that works with S3 clients (s3api before tempauth).
PROXY_PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth "
    "copy slo dlo versioned_writes symlink proxy-logging proxy-server"
)


class StoreStartError(RuntimeError):
    pass


def free_ports(count: int) -> list[int]:
    """`count` consecutive free loopback ports (Ceph binds within a range)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        if first + count > 65000:
            continue
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return list(range(first, first + count))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise StoreStartError(f"no {count} consecutive free ports")


def _missing(kind: str) -> list[str]:
    return [cmd for cmd in REQUIRED[kind] if shutil.which(cmd) is None]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise StoreStartError(f"timed out after {timeout}s waiting for {what}:\n{_tail(log)}")
        time.sleep(0.2)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test session dies, so no daemon outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Processes:
    """Daemons started by one fixture; `stop()` ends them (TERM, then KILL)."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        with open(log, "ab") as out:
            self.procs.append(
                subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env={**os.environ, **(env or {})},
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            )

    def check_alive(self, log: Path) -> bool:
        for proc in self.procs:
            if proc.poll() is not None:
                raise StoreStartError(
                    f"{proc.args[0]} exited with {proc.returncode}:\n{_tail(log)}"  # type: ignore[index]
                )
        return True

    def stop(self) -> None:
        """TERM, then KILL after 3 s in all (Swift's servers linger; the state is thrown away)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@dataclass
class ObjectStore:
    """A running store: what a test needs to reach it with S3 clients."""

    kind: str
    endpoint: str
    access_key: str
    secret_key: str
    base: Path
    startup_seconds: float
    https_endpoint: str | None = None
    ca_file: Path | None = None
    processes: Processes = field(default_factory=Processes)

    def stop(self) -> None:
        self.processes.stop()


def run(argv: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if result.returncode != 0:
        raise StoreStartError(
            f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
            f"{_tail(log)}"
        )
    return result.stdout


# -- TLS with a private CA -----------------------------------------------------


def make_ca_and_server_cert(directory: Path, name: str = "backupd test CA") -> tuple[Path, Path]:
    """A CA and a certificate for 127.0.0.1 signed by it; returns (ca.pem, key+cert pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_pem = directory / "ca.key", directory / "ca.pem"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n")
    log = directory / "openssl.log"
    openssl = ["openssl"]
    run(
        [
            *openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca_pem),
        ],
        log,
    )
    run(
        [
            *openssl,
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(csr),
        ],
        log,
    )
    run(
        [
            *openssl,
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca_pem),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(crt),
        ],
        log,
    )
    combined = directory / "server.pem"
    combined.write_text(crt.read_text() + key.read_text())
    return ca_pem, combined


# -- Ceph RGW ------------------------------------------------------------------


def start_rgw(base: Path, timeout: float = 240.0) -> ObjectStore:
    """One monitor, one OSD and radosgw (http and https) under `base`."""
    missing = _missing("rgw")
    if missing:
        raise StoreStartError(
            f"Ceph RGW cannot start: missing {', '.join(missing)} (run make deps-system)"
        )
    started = time.monotonic()
    base.mkdir(parents=True, exist_ok=True)
    for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0", "rgw", "tls"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    ports = free_ports(24)
    mon_port, http_port, https_port = ports[0], ports[1], ports[2]
    fsid = str(uuid.uuid4())
    ca_pem, server_pem = make_ca_and_server_cert(base / "tls")
    conf = base / "ceph.conf"
    frontends = (
        f"beast endpoint=127.0.0.1:{http_port} ssl_endpoint=127.0.0.1:{https_port} "
        f"ssl_certificate={server_pem}"
    )
    conf.write_text(
        textwrap.dedent(f"""\
        [global]
        fsid = {fsid}
        mon_host = v2:127.0.0.1:{mon_port}
        mon_initial_members = a
        auth_cluster_required = none
        auth_service_required = none
        auth_client_required = none
        ms_bind_msgr1 = false
        ms_bind_msgr2 = true
        public_addr = 127.0.0.1
        cluster_addr = 127.0.0.1
        ms_bind_port_min = {ports[3]}
        ms_bind_port_max = {ports[-1]}
        osd_pool_default_size = 1
        osd_pool_default_min_size = 1
        mon_allow_pool_size_one = true
        osd_crush_chooseleaf_type = 0
        mon_warn_on_pool_no_redundancy = false
        osd_pool_default_pg_num = 8
        osd_pool_default_pgp_num = 8
        osd_pool_default_pg_autoscale_mode = off
        mon_max_pg_per_osd = 1000
        run_dir = {base}/run
        admin_socket = {base}/run/$cluster-$name.asok
        log_file = {base}/log/$cluster-$name.log
        pid_file = {base}/run/$cluster-$name.pid
        keyring = {base}/keyring
        log_to_stderr = false
        err_to_stderr = true

        [mon]
        mon_data = {base}/mon/$cluster-$id

        [osd]
        osd_data = {base}/osd/$cluster-$id
        osd_objectstore = bluestore
        bluestore_block_path = {base}/osd/block-$id
        bluestore_block_create = true
        bluestore_block_size = 17179869184
        osd_memory_target = 1073741824
        bluestore_cache_autotune = false
        bluestore_cache_size = 268435456

        [client.rgw.a]
        # radosgw defaults to a secure mon connection, which needs cephx
        ms_mon_client_mode = crc
        auth_client_required = none
        rgw_data = {base}/rgw
        rgw_frontends = {frontends}
        """)
    )
    env = {"CEPH_CONF": str(conf)}
    store = ObjectStore(
        kind="rgw",
        endpoint=f"http://127.0.0.1:{http_port}",
        https_endpoint=f"https://127.0.0.1:{https_port}",
        ca_file=ca_pem,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        base=base,
        startup_seconds=0.0,
    )
    procs = store.processes
    setup_log = base / "log" / "setup.log"
    try:
        keyring = base / "keyring"
        run(
            [
                "ceph-authtool",
                "--create-keyring",
                str(keyring),
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
            setup_log,
            env,
        )
        monmap = base / "monmap"
        run(
            [
                "monmaptool",
                "--create",
                "--fsid",
                fsid,
                "--addv",
                "a",
                f"[v2:127.0.0.1:{mon_port}]",
                str(monmap),
            ],
            setup_log,
            env,
        )
        run(
            ["ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", str(keyring)],
            setup_log,
            env,
        )
        mon_log = base / "log" / "ceph-mon.a.log"
        procs.start(["ceph-mon", "-f", "-i", "a"], base / "log" / "mon.out", env)
        _wait(lambda: procs.check_alive(mon_log) and _port_open(mon_port), 30, "ceph-mon", mon_log)
        osd_uuid = str(uuid.uuid4())
        osd_id = run(["ceph", "--connect-timeout", "30", "osd", "new", osd_uuid], setup_log, env)
        if osd_id.strip() != "0":
            raise StoreStartError(f"ceph osd new gave id {osd_id.strip()!r}, expected 0")
        osd_log = base / "log" / "ceph-osd.0.log"
        run(["ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], osd_log, env)
        procs.start(["ceph-osd", "-f", "-i", "0"], base / "log" / "osd.out", env)

        def osd_up() -> bool:
            procs.check_alive(osd_log)
            out = run(["ceph", "--connect-timeout", "10", "osd", "stat"], setup_log, env)
            return "1 up" in out

        _wait(osd_up, 120, "the OSD to come up", osd_log)
        rgw_log = base / "log" / "ceph-client.rgw.a.log"
        procs.start(["radosgw", "-f", "-n", "client.rgw.a"], base / "log" / "rgw.out", env)
        _wait(
            lambda: procs.check_alive(rgw_log) and _port_open(http_port),
            max(10.0, timeout - (time.monotonic() - started)),
            "radosgw",
            rgw_log,
        )
        run(
            [
                "radosgw-admin",
                "user",
                "create",
                "--uid=backupd",
                "--display-name=backupd tests",
                f"--access-key={ACCESS_KEY}",
                f"--secret={SECRET_KEY}",
            ],
            setup_log,
            env,
        )
    except BaseException:
        procs.stop()
        raise
    store.startup_seconds = time.monotonic() - started
    return store


# -- Swift with s3api ----------------------------------------------------------


def start_swift(base: Path, timeout: float = 60.0) -> ObjectStore:
    """Account, container, object and proxy servers plus memcached under `base`."""
    missing = _missing("swift")
    if missing:
        raise StoreStartError(
            f"Swift cannot start: missing {', '.join(missing)} (run make deps-system)"
        )
    started = time.monotonic()
    base.mkdir(parents=True, exist_ok=True)
    devices = base / "devices"
    (devices / "d1").mkdir(parents=True, exist_ok=True)
    (base / "log").mkdir(exist_ok=True)
    memcached_port, proxy_port, account_port, container_port, object_port = free_ports(5)
    setup_log = base / "log" / "setup.log"
    store = ObjectStore(
        kind="swift",
        endpoint=f"http://127.0.0.1:{proxy_port}",
        access_key=f"{SWIFT_ACCOUNT}:{SWIFT_USER}",
        secret_key=SECRET_KEY,
        base=base,
        startup_seconds=0.0,
    )
    procs = store.processes
    try:
        for ring, port in (
            ("account", account_port),
            ("container", container_port),
            ("object", object_port),
        ):
            builder = str(base / f"{ring}.builder")
            run(["swift-ring-builder", builder, "create", "8", "1", "1"], setup_log)
            run(["swift-ring-builder", builder, "add", f"r1z1-127.0.0.1:{port}/d1", "1"], setup_log)
            run(["swift-ring-builder", builder, "rebalance"], setup_log)
        common = textwrap.dedent(f"""\
            [DEFAULT]
            swift_dir = {base}
            devices = {devices}
            mount_check = false
            user = root
            workers = 1
            log_name = %s
            log_facility = LOG_LOCAL0
            log_level = INFO
            """)
        for server, port in (
            ("account", account_port),
            ("container", container_port),
            ("object", object_port),
        ):
            (base / f"{server}-server.conf").write_text(
                common.replace("%s", server)
                + f"bind_ip = 127.0.0.1\nbind_port = {port}\n\n"
                + textwrap.dedent(f"""\
                [pipeline:main]
                pipeline = {server}-server

                [app:{server}-server]
                use = egg:swift#{server}

                [{server}-replicator]
                [{server}-auditor]
                [{server}-updater]
                """)
            )
        (base / "proxy-server.conf").write_text(
            common.replace("%s", "proxy")
            + f"bind_ip = 127.0.0.1\nbind_port = {proxy_port}\n\n"
            + textwrap.dedent(f"""\
            [pipeline:main]
            pipeline = {PROXY_PIPELINE}

            [app:proxy-server]
            use = egg:swift#proxy
            account_autocreate = true

            [filter:tempauth]
            use = egg:swift#tempauth
            user_{SWIFT_ACCOUNT}_{SWIFT_USER} = {SECRET_KEY} .admin

            [filter:s3api]
            use = egg:swift#s3api
            location = us-east-1
            s3_acl = false
            allow_multipart_uploads = true

            [filter:cache]
            use = egg:swift#memcache
            memcache_servers = 127.0.0.1:{memcached_port}

            [filter:catch_errors]
            use = egg:swift#catch_errors
            [filter:gatekeeper]
            use = egg:swift#gatekeeper
            [filter:healthcheck]
            use = egg:swift#healthcheck
            [filter:proxy-logging]
            use = egg:swift#proxy_logging
            [filter:listing_formats]
            use = egg:swift#listing_formats
            [filter:copy]
            use = egg:swift#copy
            [filter:slo]
            use = egg:swift#slo
            [filter:dlo]
            use = egg:swift#dlo
            [filter:versioned_writes]
            use = egg:swift#versioned_writes
            [filter:symlink]
            use = egg:swift#symlink
            """)
        )
        log = base / "log" / "servers.out"
        procs.start(
            ["memcached", "-u", "root", "-l", "127.0.0.1", "-p", str(memcached_port), "-U", "0"],
            log,
        )
        for server in ("account", "container", "object", "proxy"):
            procs.start([f"swift-{server}-server", str(base / f"{server}-server.conf")], log)
        for port, what in (
            (memcached_port, "memcached"),
            (account_port, "swift-account-server"),
            (container_port, "swift-container-server"),
            (object_port, "swift-object-server"),
            (proxy_port, "swift-proxy-server"),
        ):
            _wait(
                lambda port=port: procs.check_alive(log) and _port_open(port),  # type: ignore[misc]
                max(5.0, timeout - (time.monotonic() - started)),
                what,
                log,
            )
    except BaseException:
        procs.stop()
        raise
    store.startup_seconds = time.monotonic() - started
    return store


@dataclass
class S3Target:
    """One bucket on one S3 endpoint, and the environment variables holding its credentials."""

    kind: str
    endpoint: str
    bucket: str
    key_env: str
    secret_env: str
    ca_file: Path | None = None

    def client(self, endpoint: str | None = None) -> object:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=os.environ[self.key_env],
            aws_secret_access_key=os.environ[self.secret_env],
            verify=str(self.ca_file) if self.ca_file else None,
            config=Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                s3={"addressing_style": "path"},
            ),
        )


def new_bucket(store: ObjectStore, key_env: str, secret_env: str, https: bool = False) -> S3Target:
    """A new empty bucket on `store` (credentials exported under the two variable names)."""
    os.environ[key_env], os.environ[secret_env] = store.access_key, store.secret_key
    target = S3Target(
        kind=store.kind + ("-https" if https else ""),
        endpoint=(store.https_endpoint or "") if https else store.endpoint,
        bucket="bkt-" + uuid.uuid4().hex[:12],
        key_env=key_env,
        secret_env=secret_env,
        ca_file=store.ca_file if https else None,
    )
    target.client().create_bucket(Bucket=target.bucket)  # type: ignore[attr-defined]
    return target
