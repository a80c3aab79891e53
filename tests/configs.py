"""The one way tests write a backupd config: build it as data, render it as TOML.

A config is a plain nested dict (`{"job": {"app": {"storage": ["local"]}}}`), built by
`app_config` (one source, the given stores, one job) or by hand, extended with `merge`
(a key set twice is an error, as in TOML) and written with `write`. A test that changes a
written config does it with `edit` on dotted keys: a key that is not there fails loudly,
where a `read_text().replace(...)` that matched nothing passed silently.

The renderer writes `[section.name]` tables and inline tables below them, the layout the
README shows, so a config a test wrote reads like one an operator would.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.pgcluster import PgCluster

Doc = dict[str, Any]
# The `config_file` and `proxied_config` fixtures (conftest): database, **keys -> the file.
ConfigFile = Callable[..., Path]

S3_ENV = ("BACKUPD_TEST_AWS_KEY", "BACKUPD_TEST_AWS_SECRET")
# The job's retry when a test does not set one.
ONE_ATTEMPT = {"max_attempts": 1, "initial_delay": "1s", "max_delay": "1s"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"


# -- rendering ------------------------------------------------------------------------------


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: object) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        return _string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _is_table(value: object) -> bool:
    return isinstance(value, Mapping)


def _is_table_of_tables(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, Mapping) for v in value.values())
    )


def render(doc: Mapping[str, Any]) -> str:
    """TOML text for `doc`: `[daemon]`-style tables, `[job.name]` for tables of tables,
    inline tables and arrays below them. Insertion order is kept."""
    blocks = ["\n".join(f"{_key(k)} = {_value(v)}" for k, v in doc.items() if not _is_table(v))]
    for section, body in doc.items():
        if not _is_table(body):
            continue
        tables = body.items() if _is_table_of_tables(body) else [(None, body)]
        for name, table in tables:
            header = _key(section) if name is None else f"{_key(section)}.{_key(name)}"
            pairs = [f"{_key(k)} = {_value(v)}" for k, v in table.items()]
            blocks.append("\n".join([f"[{header}]", *pairs]))
    text = "\n\n".join(b for b in blocks if b) + "\n"
    if tomllib.loads(text) != _plain(doc):  # the writer's own check: never a silent change
        raise AssertionError(f"rendered TOML does not read back as the config:\n{text}")
    return text


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# -- building -------------------------------------------------------------------------------


def merge(base: Doc, extra: Mapping[str, Any] | str | None, *, where: str = "config") -> Doc:
    """Merge `extra` (a dict, or a TOML fragment read as one) into `base`, in place.

    Tables merge key by key; a key set on both sides is an error (TOML's own rule)."""
    if not extra:
        return base
    if isinstance(extra, str):
        extra = tomllib.loads(extra)
    for key, value in extra.items():
        old = base.get(key)
        if isinstance(old, dict) and isinstance(value, Mapping):
            merge(old, value, where=f"{where}.{key}")
        elif key in base:
            raise ValueError(f"{where}.{key} is set twice")
        else:
            base[key] = _plain(value) if not isinstance(value, Mapping) else merge({}, value)
    return base


def split_fragment(fragment: Mapping[str, Any] | str | None) -> tuple[Any, str]:
    """A table's extra keys (a dict, or TOML text) and what belongs at the top level: text
    may go on to open further tables (`[job.other]`), as it would in the file."""
    if not isinstance(fragment, str):
        return fragment, ""
    match = re.search(r"^\s*\[", fragment, re.MULTILINE)
    if match is None:
        return fragment, ""
    return fragment[: match.start()], fragment[match.start() :]


def s3_storage(endpoint: str, bucket: str, *, env: tuple[str, str] = S3_ENV, **keys: Any) -> Doc:
    """An `[storage.X]` table for an S3 bucket, credentials from the environment;
    `keys` add to it or change its defaults (`part_size`, `prefix`, ...)."""
    table: Doc = {
        "type": "s3",
        "bucket": bucket,
        "prefix": "prod/",
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "access_key_id": {"env": env[0]},
        "secret_access_key": {"env": env[1]},
        "part_size": "5MiB",
    }
    return {**table, **_plain(keys)}


def app_config(
    pg: PgCluster,
    *,
    socket: Path,
    password_file: Path | str,
    database: str,
    fs_path: Path | None = None,
    s3: tuple[str, str] | None = None,
    s3_env: tuple[str, str] = S3_ENV,
    s3_extra: Mapping[str, Any] | str | None = None,
    job: str = "app",
    extra_job: Mapping[str, Any] | str | None = None,
    extra_source: Mapping[str, Any] | str | None = None,
    extra_daemon: Mapping[str, Any] | str | None = None,
    extra: Mapping[str, Any] | str | None = None,
    storage_names: list[str] | None = None,
    http_listen: str = "",
    max_attempts: int = 1,
) -> Doc:
    """One postgres source `main`, a filesystem store `local` (if `fs_path`) and an S3 store
    `offsite` (if `s3`, `s3_extra` added to or changing its keys), and one job using all the stores,
    with `max_attempts` attempts (1 by default: a failure shows at once)."""
    extra_daemon, daemon_tail = split_fragment(extra_daemon)
    extra_source, source_tail = split_fragment(extra_source)
    s3_extra, storage_tail = split_fragment(s3_extra)
    extra_job, job_tail = split_fragment(extra_job)
    stores: Doc = {}
    if fs_path is not None:
        stores["local"] = {"type": "filesystem", "path": str(fs_path)}
    if s3 is not None:
        keys = tomllib.loads(s3_extra) if isinstance(s3_extra, str) else s3_extra or {}
        stores["offsite"] = s3_storage(*s3, env=s3_env, **keys)
    doc: Doc = {
        "daemon": merge({"socket": str(socket), "http_listen": http_listen}, extra_daemon),
        "source": {
            "main": merge(
                {
                    "type": "postgres",
                    "dsn": pg.dsn(database),
                    "password": {"file": str(password_file)},
                },
                extra_source,
                where="source.main",
            )
        },
        "storage": stores,
        "job": {
            job: merge(
                {
                    "source": "main",
                    "storage": storage_names or list(stores),
                    "min_size": "1KiB",
                    "retry": {**ONE_ATTEMPT, "max_attempts": max_attempts},
                },
                extra_job,
                where=f"job.{job}",
            )
        },
    }
    if not stores:
        del doc["storage"]
    for tail in (daemon_tail, source_tail, storage_tail, job_tail):
        merge(doc, tail)
    return merge(doc, extra)


def write(path: Path, doc: Mapping[str, Any]) -> Path:
    path.write_text(render(doc))
    return path


# -- changing a written config --------------------------------------------------------------

DELETE = object()


def edit(path: Path, changes: Mapping[str, Any]) -> Path:
    """Set (or, with `DELETE`, remove) dotted keys in the config at `path` and write it back.

    The table a key goes in must exist, and a removed key must be there: a typo fails here,
    never as a config that quietly stayed as it was."""
    doc = tomllib.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        table = doc
        for part in parents:
            if not isinstance(table.get(part), dict):
                raise KeyError(f"{path.name} has no table {dotted.rsplit('.', 1)[0]!r}")
            table = table[part]
        if value is DELETE:
            if last not in table:
                raise KeyError(f"{path.name} has no key {dotted!r} to remove")
            del table[last]
        else:
            table[last] = _plain(value)
    return write(path, doc)
