"""What ships around the package: the systemd unit, the container image, CI, pins, the demo.

These check the files an operator installs as they would meet them: the unit
through systemd's own analyzers, the sysusers/tmpfiles snippets applied to a
scratch root, the demo run end to end (slow).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.pgcluster import PG_BIN

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "backupd.service"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "--no-pager", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
        timeout=60,
    )


@needs_systemd_analyze
def test_service_unit_is_rated_ok_by_systemd_analyze_security() -> None:
    out = _systemd_analyze("security", "--offline=yes", str(UNIT))
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", out.stdout)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= 2.0, out.stdout
    assert m.group(2) == "OK"


@needs_systemd_analyze
def test_service_unit_has_only_directives_systemd_knows() -> None:
    """Every line parses: no unknown key, section or value.

    Offline, verify also complains that /usr/bin/backupd does not exist (the
    package is not installed system-wide here); that one line is expected.
    """
    out = _systemd_analyze("verify", "--man=no", "--generators=no", str(UNIT))
    complaints = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and "Command /usr/bin/backupd is not executable" not in line
    ]
    assert complaints == []


@pytest.mark.skipif(
    os.geteuid() != 0
    or not (shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")),
    reason="needs root and systemd-sysusers/systemd-tmpfiles",
)
def test_sysusers_and_tmpfiles_create_the_user_and_a_private_backup_dir(tmp_path: Path) -> None:
    for kind in ("sysusers", "tmpfiles"):
        conf = tmp_path / "usr" / "lib" / f"{kind}.d" / "backupd.conf"
        conf.parent.mkdir(parents=True)
        shutil.copy(ROOT / "systemd" / f"backupd.{kind}", conf)
    (tmp_path / "etc").mkdir()
    (tmp_path / "var" / "backups").mkdir(parents=True)

    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", "backupd.conf"], check=True)
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", "backupd.conf"], check=True
    )

    users = {
        fields[0]: fields
        for fields in (
            line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()
        )
    }
    _, _, uid, gid, _, home, shell = users["backupd"]
    assert (home, shell) == ("/var/lib/backupd", "/usr/sbin/nologin")
    st = (tmp_path / "var/backups/backupd").stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o700, int(uid), int(gid))


def _containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Containerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            pairs.append((instruction.upper(), args.strip()))
    return pairs


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, args in _containerfile():
        if instruction == "FROM":
            stages.append([])
        stages[-1].append((instruction, args))
    return stages


def test_container_image_runs_unprivileged_with_a_healthcheck_and_exec_entrypoint() -> None:
    _, final = _stages()
    by_name: dict[str, list[str]] = {}
    for instruction, args in final:
        by_name.setdefault(instruction, []).append(args)

    assert by_name["FROM"] == ["python:3.11-slim-bookworm"]
    user = by_name["USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    # The health check asks the daemon where the config says it listens, not a fixed port.
    health = by_name["HEALTHCHECK"][-1]
    assert health.endswith('CMD ["backupd", "health"]') and "9187" not in health
    # Exec form, so SIGTERM reaches backupd (through tini) rather than a shell; `run` is
    # only the default command, so `podman run IMAGE check` works.
    assert json.loads(by_name["ENTRYPOINT"][-1]) == ["tini", "--", "backupd"]
    assert json.loads(by_name["CMD"][-1]) == ["run"]
    assert by_name["STOPSIGNAL"] == ["SIGTERM"]
    env = " ".join(by_name["ENV"])
    assert "CREDENTIALS_DIRECTORY=/run/secrets" in env
    volumes = [v for arg in by_name.get("VOLUME", []) for v in json.loads(arg)]
    assert "/etc/backupd" not in volumes and "/run/backupd" not in volumes
    # The final image takes the built venv; build arguments stay in the builder stage.
    assert any(args.startswith("--from=builder ") for _, args in final if _ == "COPY")
    assert "ARG" not in by_name


def test_container_build_installs_dependencies_before_the_source_and_takes_an_index_and_ca() -> (
    None
):
    builder, _ = _stages()
    args = {a.split("=", 1)[0] for i, a in builder if i == "ARG"}
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "EXTRA_CA_CERT"} <= args
    copies = [(n, a) for n, (i, a) in enumerate(builder) if i == "COPY"]
    runs = [(n, a) for n, (i, a) in enumerate(builder) if i == "RUN"]
    deps = next(n for n, a in runs if "-c constraints.txt -r requirements.txt" in a)
    source = next(n for n, a in copies if a.startswith("backupd "))
    assert all("backupd" not in a.split()[:-1] for n, a in copies if n < deps)
    assert deps < source
    assert any(n > source and "--no-deps" in a for n, a in runs)
    assert any("update-ca-certificates" in a and "EXTRA_CA_CERT" in a for _, a in runs)
    for _, copy in copies:
        *sources, _dest = copy.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    # The requirements the builder derives are pyproject's dependencies.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["dependencies"]


def test_make_demo_installs_only_what_the_demo_needs(tmp_path: Path) -> None:
    """`make demo` on a fresh checkout: backupd without the test extras, no test packages."""
    plan = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "demo", f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plan.returncode == 0, plan.stderr
    assert "pip install -c constraints.txt -e .\n" in plan.stdout
    assert ".[test]" not in plan.stdout
    deps = subprocess.run(
        ["make", "-n", "-C", str(ROOT), "deps-system", "DEPS=demo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert deps.returncode == 0, deps.stderr
    assert 'if [ "demo" != demo ]' in deps.stdout  # prometheus, chromium, gcc... skipped


def test_ci_runs_the_readme_test_command() -> None:
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK)
    commands = [line.strip() for line in ci.read_text().splitlines()]
    assert "set -euo pipefail" in commands
    assert "make test" in commands


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_dependency_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *(req for extra in project["optional-dependencies"].values() for req in extra),
    ]
    pins = _pins()
    assert "backupd" not in pins
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside {req.specifier}"
        )


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    # Not tmp_path: as root the cluster belongs to postgres, who must reach the directory.
    base = Path(tempfile.mkdtemp(prefix="backupd-demo-"))
    os.chmod(base, 0o755)
    yield base / "demo"
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_demo_backs_up_and_restores_every_row(demo_dir: Path) -> None:
    env = {
        **os.environ,
        "BACKUPD": str(Path(sys.executable).parent / "backupd"),
        "PG_BIN": str(PG_BIN),
        "DEMO_DIR": str(demo_dir),
    }
    out = subprocess.run(
        [str(ROOT / "scripts" / "demo.sh")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "every table restored with all its rows" in out.stdout
    assert "backupd stopped cleanly" in out.stdout
    assert any((demo_dir / "backups").rglob("*.manifest.json"))
