"""The config file: TOML -> `backupd.config`'s frozen dataclasses; errors with key paths.

Loading has no side effects beyond reading the file: secrets stay references
(`Secret`) until a run resolves them. Durations are seconds (float), sizes
are bytes (int).

Validation collects every problem before giving up, so `backupd check` can
show an operator all of them at once, each as "dotted.key.path: message".
Messages never repeat a secret: a plain string where a secret belongs, or a
DSN, is described, not quoted.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import math
import os
import re
import tomllib
import zoneinfo
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
from typing import Any, TypeVar
from urllib.parse import urlsplit

import tomli_w

from backupd.config import (
    ADDRESSING_STYLES,
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    DUMP_FORMATS,
    JOB_KINDS,
    LOG_FORMATS,
    LOG_LEVELS,
    NOTIFIER_TYPES,
    NOTIFY_EVENTS,
    S3_CHECKSUMS,
    Compression,
    CompressionAlgorithm,
    Config,
    DaemonConfig,
    Encryption,
    FilesystemStorage,
    Job,
    Notifier,
    PostgresSource,
    Retention,
    RetryPolicy,
    S3Storage,
    Secret,
    Storage,
    VerifyPolicy,
    WalPolicy,
)
from backupd.crypto import parse_recipient
from backupd.dsn import PORT_RE, SECRET_KEYWORDS, SPACE, dsn_params
from backupd.errors import BackupdError, ConfigError
from backupd.scheduler import validate_cron

# --------------------------------------------------------------------------
# Public entry points


def config_path(cli_value: str | None) -> str:
    """Where the config lives: `-c FILE`, else `$BACKUPD_CONFIG`, else the default."""
    if cli_value is not None:
        return cli_value
    return os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file; every problem is raised as one ConfigError."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read the config file: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{name}:{line}: invalid TOML: the file is not UTF-8"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_syntax_error(name, exc)]) from None
    return parse_config(data, name)


def parse_config(data: dict[str, Any], path: str = "") -> Config:
    """Validate parsed TOML (pure); raise ConfigError listing every problem.

    The order is fixed: section by section (daemon, defaults, source, storage, job,
    notify), entries as in the file, each entry's keys in schema order, unknown keys last.
    """
    errors: list[str] = []
    root_ctx = _Ctx("", errors)
    if not isinstance(data, dict):
        raise ConfigError([f"the config must be a table, got {_describe(data)}"])
    root = _Table(data, root_ctx)
    names = _Names(
        sources=_section_names(data, "source"),
        storages=_section_names(data, "storage"),
        notifiers=_section_names(data, "notify"),
    )
    daemon = _daemon(root)
    defaults = _defaults(root, names)
    sources = _entities(root, "source", _source)
    storages: dict[str, Storage] = _entities(root, "storage", _storage)
    jobs = _entities(root, "job", lambda name, t: _job(name, t, defaults, daemon, names))
    notifiers = _entities(root, "notify", _notifier)
    root.close()
    if errors or daemon is None:
        raise ConfigError(errors)
    return Config(
        daemon=daemon,
        sources=sources,
        storages=storages,
        jobs=jobs,
        notifiers=notifiers,
        path=path,
    )


def config_to_toml(cfg: Config) -> str:
    """The effective config as TOML (`backupd check --show`): defaults applied, secrets as refs.

    Loading the output again gives an equal Config.
    """
    doc: dict[str, Any] = {"daemon": _daemon_doc(cfg.daemon)}
    if cfg.sources:
        doc["source"] = {name: _source_doc(s) for name, s in cfg.sources.items()}
    if cfg.storages:
        doc["storage"] = {name: _storage_doc(s) for name, s in cfg.storages.items()}
    if cfg.jobs:
        doc["job"] = {name: _job_doc(j) for name, j in cfg.jobs.items()}
    if cfg.notifiers:
        doc["notify"] = {name: _notifier_doc(n) for name, n in cfg.notifiers.items()}
    return tomli_w.dumps(doc)


# --------------------------------------------------------------------------
# Durations, sizes, compression: public because the CLI and logs use them too

_DURATION_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_DURATION_RE = re.compile(
    "".join(rf"(?:(?P<{unit}>\d+(?:\.\d{{1,9}})?){unit})?" for unit, _ in _DURATION_UNITS)
)
_DURATION_EXAMPLES = '"90s", "15m", "6h", "7d" or "1h30m"'
_NANOSECOND = Decimal("0.000000001")
MAX_DURATION = 36500 * 86400.0  # 100 years: longer is a typo, and would overflow timers


def parse_duration(text: str) -> float:
    """`"1h30m"` -> 5400.0. Units d, h, m, s in that order, each at most once; "0s" is zero.

    Numbers may have up to 9 decimals ("1.5h", "0.25s").

    Raises ValueError naming the accepted spellings.
    """
    match = _DURATION_RE.fullmatch(text) if len(text) <= 64 else None
    if not text or match is None:
        raise ValueError(f"expected a duration like {_DURATION_EXAMPLES}, got {_describe(text)}")
    total = sum(
        (Decimal(match[unit]) * factor for unit, factor in _DURATION_UNITS if match[unit]),
        Decimal(0),
    )
    if total > Decimal(MAX_DURATION):
        raise ValueError(f"a duration must be at most 36500d (100 years), got {_describe(text)}")
    return float(total)


def format_duration(seconds: float) -> str:
    """5400.0 -> `"1h30m"`; the inverse of parse_duration (negative values get a "-")."""
    if not math.isfinite(seconds):
        raise ValueError(f"cannot format a non-finite duration: {seconds!r}")
    if seconds < 0:
        return "-" + format_duration(-seconds)
    parts = []
    with localcontext(prec=400):  # enough digits for any float, to the nanosecond
        # The shortest decimal that reads back as `seconds`, to the nanosecond: exact for
        # every value parse_duration returns.
        rest = Decimal(repr(float(seconds))).quantize(_NANOSECOND)
        for unit, factor in _DURATION_UNITS[:-1]:
            count, rest = divmod(rest, factor)
            if count:
                parts.append(f"{count:f}{unit}")
    if rest or not parts:
        text = f"{rest:f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        parts.append(f"{text}s")
    return "".join(parts)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_SPELLINGS = ("TiB", "GiB", "MiB", "KiB", "TB", "GB", "MB", "KB")
_SIZE_RE = re.compile(r"(\d{1,20}) ?([A-Za-z]{0,3})")


def parse_size(text: str) -> int:
    """`"16MiB"` -> 16777216. Binary (KiB..TiB) and decimal (KB..TB) units; bare digits are bytes.

    Raises ValueError naming the accepted spellings.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None or match[2].lower() not in _SIZE_UNITS:
        raise ValueError(f'expected a size like "16MiB", "1GiB" or "512", got {_describe(text)}')
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


def format_size(n: int) -> str:
    """16777216 -> `"16MiB"`: the shortest exact spelling, binary units preferred."""
    if n < 0:
        raise ValueError(f"a size cannot be negative: {n}")
    if n == 0:
        return "0"
    exact = [
        f"{n // _SIZE_UNITS[unit.lower()]}{unit}"
        for unit in _SIZE_SPELLINGS
        if n % _SIZE_UNITS[unit.lower()] == 0
    ]
    # Shortest wins; on a tie a unit beats bare digits ("1KiB" over "1024").
    return min([*exact, str(n)], key=len)


_COMPRESSION_RE = re.compile(r"(none|gzip|zstd|lz4)(?::([0-9]{1,2}))?")
_COMPRESSION_LEVELS: dict[str, tuple[int, int] | None] = {
    "none": None,
    "gzip": (1, 9),
    "zstd": (1, 19),
    "lz4": (0, 16),
}
_COMPRESSION_FORMS = "none, gzip[:1-9], zstd[:1-19] or lz4[:0-16]"


def parse_compression(text: str) -> Compression:
    """`"zstd:3"` -> Compression("zstd", 3); without a level, the codec's default (level None)."""
    match = _COMPRESSION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"expected {_COMPRESSION_FORMS}, got {_describe(text)}")
    algorithm: CompressionAlgorithm
    algorithm = next(a for a in ("none", "gzip", "zstd", "lz4") if a == match[1])
    if match[2] is None:
        return Compression(algorithm, None)
    levels = _COMPRESSION_LEVELS[algorithm]
    if levels is None:
        raise ValueError(f'"none" takes no level, got {_describe(text)}')
    level = int(match[2])
    if not levels[0] <= level <= levels[1]:
        raise ValueError(
            f"{algorithm} levels go from {levels[0]} to {levels[1]}, got {_describe(text)}"
        )
    return Compression(algorithm, level)


# --------------------------------------------------------------------------
# Validation machinery


_T = TypeVar("_T")
_S = TypeVar("_S", bound=str)


class _Invalid(Exception):
    """A value is wrong as a whole; the message says why, without quoting secrets."""


class _Ctx:
    """A position in the document and the shared list of errors found so far."""

    __slots__ = ("errors", "path")

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors

    def child(self, key: object) -> _Ctx:
        part = _key_text(key)
        return _Ctx(f"{self.path}.{part}" if self.path else part, self.errors)

    def error(self, message: str) -> None:
        self.errors.append(f"{self.path}: {message}" if self.path else message)

    def mark(self) -> int:
        return len(self.errors)

    def failed_since(self, mark: int) -> bool:
        return len(self.errors) > mark


_Parser = Callable[[object, _Ctx], _T]


class _Table:
    """One TOML table being read: remembers which keys were used to report the rest as unknown."""

    def __init__(self, value: object, ctx: _Ctx) -> None:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a table, got {_describe(value)}")
        self.data: dict[Any, Any] = value
        self.ctx = ctx
        self.known: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def read(self, schema: Mapping[str, _Parser[Any]]) -> dict[str, Any]:
        """Parse every schema key present; return only the values that parsed cleanly."""
        values: dict[str, Any] = {}
        for key, parser in schema.items():
            self.known.append(key)
            if key in self.data:
                ctx = self.ctx.child(key)
                mark = ctx.mark()
                value = _parse(parser, self.data[key], ctx)
                if not ctx.failed_since(mark):
                    values[key] = value
        return values

    def require(self, *keys: str) -> None:
        for key in keys:
            if key not in self.data:
                self.ctx.child(key).error("missing required key")

    def close(self) -> None:
        """Report keys no schema claimed, with a hint when one is close to a known key."""
        for key in self.data:
            if key not in self.known:
                close = difflib.get_close_matches(str(key), self.known, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self.ctx.child(key).error(f"unknown key{hint}")


def _parse(parser: _Parser[_T], value: object, ctx: _Ctx) -> _T | None:
    try:
        return parser(value, ctx)
    except _Invalid as exc:
        ctx.error(str(exc))
        return None


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key_text(key: object) -> str:
    text = str(key)
    return text if _BARE_KEY.fullmatch(text) else json.dumps(text, ensure_ascii=False)


def _describe(value: object) -> str:
    """A value as it would appear in TOML, shortened; never used where a secret may be."""
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:57] + "...", ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 128 else "a huge integer"
    if isinstance(value, float):
        return repr(value)
    return _kind(value)


_TOML_KINDS: tuple[tuple[type, str], ...] = (
    (str, "a string"),
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (dict, "a table"),
    (list, "an array"),
    (dt.datetime, "a date-time"),
    (dt.date, "a date"),
    (dt.time, "a time"),
)


def _kind(value: object) -> str:
    """A value's TOML type only, for places where the value itself may be a secret."""
    return next((name for kind, name in _TOML_KINDS if isinstance(value, kind)), "a value")


def _toml_syntax_error(path: str, exc: tomllib.TOMLDecodeError) -> str:
    reason = str(exc)
    where = re.search(r" \(at line (\d+), column (\d+)\)$", reason)
    if where is None:
        return f"{path}: invalid TOML: {reason}"
    return f"{path}:{where[1]}:{where[2]}: invalid TOML: {reason[: where.start()]}"


# --------------------------------------------------------------------------
# Value parsers: each takes the raw TOML value and its position


def _string(value: object, ctx: _Ctx) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_describe(value)}")
    if "\x00" in value:
        raise _Invalid("must not contain a NUL character")
    return value


def _nonempty(value: object, ctx: _Ctx) -> str:
    text = _string(value, ctx)
    if not text:
        raise _Invalid("expected a non-empty string")
    return text


def _bool(value: object, ctx: _Ctx) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_describe(value)}")
    return value


def _int(minimum: int, maximum: int | None = None) -> _Parser[int]:
    what = (
        f"an integer >= {minimum}"
        if maximum is None
        else f"an integer between {minimum} and {maximum}"
    )

    def parse(value: object, ctx: _Ctx) -> int:
        # TOML booleans are not numbers, though Python's bool is an int.
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            raise _Invalid(f"expected {what}, got {_describe(value)}")
        return value

    return parse


def _number(minimum: float) -> _Parser[float]:
    def parse(value: object, ctx: _Ctx) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < minimum
        ):
            raise _Invalid(f"expected a number >= {minimum}, got {_describe(value)}")
        return float(value)

    return parse


def _choice(options: tuple[_S, ...]) -> _Parser[_S]:
    def parse(value: object, ctx: _Ctx) -> _S:
        for option in options:
            if value == option:
                return option
        spelled = ", ".join(f'"{option}"' for option in options)
        raise _Invalid(f"expected one of {spelled}, got {_describe(value)}")

    return parse


def _array(
    item: _Parser[_T],
    what: str,
    *,
    single: bool = False,
    unique: bool = False,
    at_least_one: str = "",
) -> _Parser[tuple[_T, ...]]:
    """An array of `item`s; `single` also takes one bare string; errors name the bad items."""

    def parse(value: object, ctx: _Ctx) -> tuple[_T, ...]:
        if single and isinstance(value, str):
            raw: list[object] = [value]
        elif isinstance(value, list):
            raw = value
        else:
            raise _Invalid(f"expected {what}, got {_describe(value)}")
        if at_least_one and not raw:
            raise _Invalid(at_least_one)
        items: list[_T] = []
        for element in raw:
            try:
                items.append(item(element, ctx))
            except _Invalid as exc:
                ctx.error(str(exc))
        if unique:
            for x in dict.fromkeys(x for i, x in enumerate(items) if x in items[:i]):
                ctx.error(f"{_describe(x)} is listed more than once")
        return tuple(items)

    return parse


def _duration(*, positive: bool = False) -> _Parser[float]:
    def parse(value: object, ctx: _Ctx) -> float:
        if not isinstance(value, str):
            raise _Invalid(
                f"expected a duration string like {_DURATION_EXAMPLES}, got {_describe(value)}"
            )
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
        if positive and seconds <= 0:
            raise _Invalid(f"expected a duration > 0, got {_describe(value)}")
        return seconds

    return parse


_positive_duration = _duration(positive=True)


def _optional_max_age(value: object, ctx: _Ctx) -> float | None:
    """A retention age limit; "" means none."""
    return None if value == "" else _positive_duration(value, ctx)


def _size(minimum: int = 0, maximum: int | None = None) -> _Parser[int]:
    def parse(value: object, ctx: _Ctx) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            size = value
        elif isinstance(value, str):
            try:
                size = parse_size(value)
            except ValueError as exc:
                raise _Invalid(str(exc)) from None
        else:
            raise _Invalid(f'expected a size like "16MiB", "1GiB" or "512", got {_describe(value)}')
        if size < minimum or (maximum is not None and size > maximum):
            bounds = (
                f"at least {format_size(minimum)}"
                if maximum is None
                else f"between {format_size(minimum)} and {format_size(maximum)}"
            )
            raise _Invalid(f"expected a size {bounds}, got {_describe(value)}")
        return size

    return parse


def _compression(value: object, ctx: _Ctx) -> Compression:
    if not isinstance(value, str):
        raise _Invalid(f"expected {_COMPRESSION_FORMS}, got {_describe(value)}")
    try:
        return parse_compression(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _cron(value: object, ctx: _Ctx) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a cron expression string, got {_describe(value)}")
    problem = validate_cron(value)
    if problem is not None:
        raise _Invalid(f"invalid cron expression {_describe(value)}: {problem}")
    return value


_cron_list = _array(_cron, "a cron expression or an array of them", single=True)


def _schedule(value: object, ctx: _Ctx) -> tuple[str, ...]:
    """One cron expression or several; "" means none (manual runs only)."""
    if value == "":
        return ()
    return _cron_list(value, ctx)


def _timezone(value: object, ctx: _Ctx) -> str:
    name = _string(value, ctx)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise _Invalid(
            f'unknown time zone {_describe(name)} (expected an IANA name like "Europe/Berlin")'
        ) from None
    return name


def _absolute_path(value: object, ctx: _Ctx) -> str:
    path = _string(value, ctx)
    if not path.startswith("/"):
        raise _Invalid(f"expected an absolute path, got {_describe(path)}")
    return path


def _optional_absolute_path(value: object, ctx: _Ctx) -> str:
    return "" if value == "" else _absolute_path(value, ctx)


_MAX_SOCKET_PATH = 107  # sizeof(sun_path) - 1 on Linux


def _socket_path(value: object, ctx: _Ctx) -> str:
    path = _absolute_path(value, ctx)
    if len(path.encode("utf-8", "surrogatepass")) > _MAX_SOCKET_PATH:
        raise _Invalid(f"a Unix socket path can be at most {_MAX_SOCKET_PATH} bytes long")
    return path


def _socket_mode(value: object, ctx: _Ctx) -> int:
    if (
        not isinstance(value, str)
        or not re.fullmatch(r"[0-7]{3,4}", value)
        or int(value, 8) > 0o777
    ):
        raise _Invalid(f'expected an octal mode string like "0660", got {_describe(value)}')
    return int(value, 8)


def _optional_name(value: object, ctx: _Ctx) -> str | None:
    return _string(value, ctx) or None


def _listen_address(value: object, ctx: _Ctx) -> str:
    text = _string(value, ctx)
    if text == "":
        return ""
    host, colon, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (
        not colon
        or not host
        or (":" in host and not bracketed)
        or PORT_RE.fullmatch(port) is None
        or int(port) > 65535
    ):
        raise _Invalid(
            'expected "HOST:PORT" like "127.0.0.1:9187" or "[::1]:9187", '
            f'or "" to turn HTTP off, got {_describe(text)}'
        )
    return text


def _http_url(value: object, ctx: _Ctx) -> str:
    """An http(s) URL; the value is not quoted in errors since URLs can carry tokens."""
    url = _string(value, ctx)
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok or any(c in url for c in SPACE):
        raise _Invalid("expected an http:// or https:// URL")
    return url


def _optional_http_url(value: object, ctx: _Ctx) -> str:
    return "" if value == "" else _http_url(value, ctx)


_REFERENCE_FORMS = (
    '{ file = "PATH" } (a file only backupd can read; relative paths are looked up in '
    '$CREDENTIALS_DIRECTORY) or { env = "NAME" } (an environment variable)'
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _secret(value: object, ctx: _Ctx) -> Secret:
    """`{ file = ... }` or `{ env = ... }`; the value itself is never quoted back."""
    if isinstance(value, str):
        raise _Invalid(f"secrets are not written in the config file; use {_REFERENCE_FORMS}")
    if not isinstance(value, dict):
        raise _Invalid(f"expected {_REFERENCE_FORMS}, got {_kind(value)}")
    if len(value) != 1 or next(iter(value)) not in ("file", "env"):
        raise _Invalid(f"expected exactly one key, file or env: {_REFERENCE_FORMS}")
    key, ref = next(iter(value.items()))
    if not isinstance(ref, str) or not ref or "\x00" in ref:
        raise _Invalid(f"{key}: expected a non-empty string, got {_kind(ref)}")
    if key == "env":
        if _ENV_NAME.fullmatch(ref) is None:
            raise _Invalid(f"env: not a valid environment variable name: {_describe(ref)}")
        return Secret(env=ref)
    return Secret(file=ref)


def _url_or_secret(value: object, ctx: _Ctx) -> Secret | str:
    return _http_url(value, ctx) if isinstance(value, str) else _secret(value, ctx)


def _dsn(password_hint: str) -> _Parser[str]:
    def parse(value: object, ctx: _Ctx) -> str:
        # Never quote the DSN back: it may hold a password.
        if not isinstance(value, str):
            raise _Invalid(
                f"expected a postgresql:// URL or keyword=value string, got {_kind(value)}"
            )
        if "\x00" in value:
            raise _Invalid("must not contain a NUL character")
        if not value.strip():
            raise _Invalid("expected a postgresql:// URL or keyword=value string, got nothing")
        try:
            params = dsn_params(value)
        except ValueError as exc:
            raise _Invalid(f"invalid DSN: {exc}") from None
        for key, secret in params.items():
            keyword = key.lower()
            if keyword in SECRET_KEYWORDS and secret:
                fix = password_hint if keyword == "password" else "remove it"
                raise _Invalid(
                    f"the DSN contains a {keyword}; secrets do not belong in the config file: {fix}"
                )
        return value

    return parse


_SOURCE_DSN_FIX = (
    'remove it from the DSN and set password = { file = "..." } or { env = "..." } instead'
)
_VERIFY_DSN_FIX = "remove it from the DSN and give it to libpq in a ~/.pgpass file (PGPASSFILE)"


def _recipient(value: object, ctx: _Ctx) -> str:
    if isinstance(value, str) and value.strip().upper().startswith("AGE-SECRET-KEY-"):
        # Never quote it back: the key is in the config file, so treat it as exposed.
        raise _Invalid(
            "this is an age SECRET key: only public keys (age1..., from "
            "`age-keygen -y KEYFILE`) belong here; treat this key as exposed and make a new one"
        )
    if not isinstance(value, str) or not value.startswith("age1") or not value.isascii():
        raise _Invalid(f'expected an age public key starting with "age1", got {_describe(value)}')
    try:
        parse_recipient(value)
    except BackupdError:
        raise _Invalid(f"not a valid age public key: {_describe(value)}") from None
    return value


_recipients = _array(
    _recipient,
    "an array of age public keys",
    unique=True,
    at_least_one="expected at least one age public key",
)


def _encryption(value: object, ctx: _Ctx) -> Encryption:
    t = _Table(value, ctx)
    values = t.read({"recipients": _recipients})
    t.require("recipients")
    t.close()
    return Encryption(recipients=values.get("recipients", ()))


_RETENTION_SCHEMA: dict[str, _Parser[Any]] = {
    "keep_last": _int(0),
    "keep_daily": _int(0),
    "keep_weekly": _int(0),
    "keep_monthly": _int(0),
    "keep_yearly": _int(0),
    "max_age": _optional_max_age,
}


def _retention(value: object, ctx: _Ctx) -> Retention:
    t = _Table(value, ctx)
    values = t.read(_RETENTION_SCHEMA)
    t.close()
    return Retention(**values)


_RETRY_SCHEMA: dict[str, _Parser[Any]] = {
    "max_attempts": _int(1),
    "initial_delay": _duration(),
    "max_delay": _duration(),
    "multiplier": _number(1.0),
}


def _retry(value: object, ctx: _Ctx) -> RetryPolicy:
    t = _Table(value, ctx)
    policy = RetryPolicy(**t.read(_RETRY_SCHEMA))
    t.close()
    if policy.max_delay < policy.initial_delay:
        ctx.child("max_delay").error(
            f"must be at least initial_delay ({format_duration(policy.initial_delay)})"
        )
    return policy


_VERIFY_SCHEMA: dict[str, _Parser[Any]] = {
    "schedule": _schedule,
    "restore": _bool,
    "target": _dsn(_VERIFY_DSN_FIX),
}


def _verify(value: object, ctx: _Ctx) -> VerifyPolicy:
    t = _Table(value, ctx)
    policy = VerifyPolicy(**t.read(_VERIFY_SCHEMA))
    t.close()
    return policy  # restore = true without a target: checked in _job, which knows the kind


# -- physical jobs (issue 16) --
_SLOT = re.compile(r"[a-z0-9_]{1,63}")


def _slot(value: object, ctx: _Ctx) -> str:
    name = _nonempty(value, ctx)
    if not _SLOT.fullmatch(name):
        raise _Invalid(
            f"a replication slot name is 1-63 lowercase letters, digits and _, "
            f"got {_describe(name)}"
        )
    return name


_WAL_SCHEMA: dict[str, _Parser[Any]] = {
    "slot": _slot,
    "max_lag": _positive_duration,
    "spool": _absolute_path,
}


def _wal(value: object, ctx: _Ctx) -> WalPolicy:
    t = _Table(value, ctx)
    policy = WalPolicy(**t.read(_WAL_SCHEMA))
    t.close()
    return policy


# Keys of logical dumps that mean nothing to a physical job (a whole cluster, by pg_basebackup).
_NOT_PHYSICAL = ("databases", "globals", "format", "tables", "exclude_tables", "exclude_table_data")


def _check_physical(t: _Table, values: dict[str, Any], own: Mapping[str, Any]) -> None:
    if values.get("kind") != "physical":
        if "wal" in values:
            t.ctx.child("wal").error('only a kind = "physical" job archives WAL')
        return
    for key in _NOT_PHYSICAL:
        values.pop(key, None)  # from [defaults]: fine, not meant for this job
        if key in own:
            t.ctx.child(key).error(
                'a kind = "physical" job backs up the whole cluster: remove this key'
            )
    values.setdefault("wal", WalPolicy())


def _databases(value: object, ctx: _Ctx) -> tuple[str, ...]:
    names = _array(_nonempty, "an array of database names", unique=True)(value, ctx)
    if "*" in names and len(names) > 1:
        raise _Invalid('"*" (every database) cannot be combined with database names')
    return names


_names_list = _array(_nonempty, "a name or an array of names", single=True, unique=True)

_JOB_SCHEMA: dict[str, _Parser[Any]] = {
    "source": _nonempty,
    "databases": _databases,
    "globals": _bool,
    "storage": _array(
        _nonempty,
        "a storage name or an array of them",
        single=True,
        unique=True,
        at_least_one="expected at least one storage",
    ),
    "schedule": _schedule,
    "timezone": _timezone,
    "jitter": _duration(),
    "catch_up": _bool,
    "kind": _choice(JOB_KINDS),
    "format": _choice(DUMP_FORMATS),
    "tables": _array(_nonempty, "an array of table patterns"),
    "exclude_tables": _array(_nonempty, "an array of table patterns"),
    "exclude_table_data": _array(_nonempty, "an array of table patterns"),
    "encryption": _encryption,
    "min_size": _size(),
    "retention": _retention,
    "verify": _verify,
    "notify": _names_list,
    "retry": _retry,
    "timeout": _positive_duration,
    "compression": _compression,
    "wal": _wal,  # kind = "physical" only (issue 16)
}
_REQUIRED_JOB_KEYS = ("source", "storage")

_DAEMON_SCHEMA: dict[str, _Parser[Any]] = {
    "socket": _socket_path,
    "socket_mode": _socket_mode,
    "socket_group": _optional_name,
    "allow_uids": _array(_int(0, 2**32 - 2), "an array of user ids"),
    "http_listen": _listen_address,
    "max_concurrent_jobs": _int(1),
    "timezone": _timezone,
    "shutdown_grace": _duration(),
    "log_format": _choice(LOG_FORMATS),
    "log_level": _choice(LOG_LEVELS),
}

_POSTGRES_SCHEMA: dict[str, _Parser[Any]] = {
    "dsn": _dsn(_SOURCE_DSN_FIX),
    "password": _secret,
    "pg_bin_dir": _optional_absolute_path,
    "max_concurrent": _int(1),
}


def _s3_prefix(value: object, ctx: _Ctx) -> str:
    prefix = _string(value, ctx)
    if prefix.startswith("/"):
        raise _Invalid(f'S3 keys do not start with "/", got {_describe(prefix)}')
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _bucket(value: object, ctx: _Ctx) -> str:
    bucket = _nonempty(value, ctx)
    if "/" in bucket or any(c in bucket for c in SPACE):
        raise _Invalid(f"not a bucket name: {_describe(bucket)}")
    return bucket


MIN_PART_SIZE = 5 * 1024**2  # S3's smallest part (all but the last)
MAX_PART_SIZE = 5 * 1024**3  # S3's largest part

_S3_SCHEMA: dict[str, _Parser[Any]] = {
    "bucket": _bucket,
    "prefix": _s3_prefix,
    "endpoint_url": _optional_http_url,
    "region": _nonempty,
    "access_key_id": _secret,
    "secret_access_key": _secret,
    "part_size": _size(MIN_PART_SIZE, MAX_PART_SIZE),
    "upload_concurrency": _int(1, 64),
    "storage_class": _string,
    "addressing_style": _choice(ADDRESSING_STYLES),
    "checksum": _choice(S3_CHECKSUMS),
    "abandoned_upload_grace": _positive_duration,
}

_FILESYSTEM_SCHEMA: dict[str, _Parser[Any]] = {
    "path": _absolute_path,
    "abandoned_upload_grace": _positive_duration,
}

_NOTIFIER_SCHEMA: dict[str, _Parser[Any]] = {
    "url": _url_or_secret,
    "on": _array(_choice(NOTIFY_EVENTS), "an array of events"),
    "timeout": _positive_duration,
}


# --------------------------------------------------------------------------
# Sections


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class _Names:
    """Names defined in each named section, for checking references between sections."""

    sources: frozenset[str]
    storages: frozenset[str]
    notifiers: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Defaults:
    values: dict[str, Any]  # job keys from [defaults] that parsed cleanly
    given: frozenset[str]  # every job key [defaults] sets, valid or not


def _section_names(data: Mapping[str, Any], section: str) -> frozenset[str]:
    value = data.get(section)
    return frozenset(str(name) for name in value) if isinstance(value, dict) else frozenset()


def _sub_table(root: _Table, key: str) -> _Table | None:
    root.known.append(key)
    if key not in root:
        return None
    try:
        return _Table(root.data[key], root.ctx.child(key))
    except _Invalid as exc:
        root.ctx.child(key).error(str(exc))
        return None


def _daemon(root: _Table) -> DaemonConfig | None:
    t = _sub_table(root, "daemon")
    if t is None:
        return DaemonConfig()
    mark = t.ctx.mark()
    values = t.read(_DAEMON_SCHEMA)
    t.close()
    return None if t.ctx.failed_since(mark) else DaemonConfig(**values)


def _defaults(root: _Table, names: _Names) -> _Defaults:
    t = _sub_table(root, "defaults")
    if t is None:
        return _Defaults({}, frozenset())
    values = t.read(_JOB_SCHEMA)
    _check_references(t.ctx, values, names)
    t.close()
    return _Defaults(values, frozenset(k for k in t.data if k in _JOB_SCHEMA))


def _entities(
    root: _Table, section: str, build: Callable[[str, _Table], _T | None]
) -> dict[str, _T]:
    """Build each `[section.NAME]`; entries with errors are left out (the errors are kept)."""
    t = _sub_table(root, section)
    if t is None:
        return {}
    built: dict[str, _T] = {}
    for name, value in t.data.items():
        ctx = t.ctx.child(name)
        mark = ctx.mark()
        if _NAME.fullmatch(name) is None:
            ctx.error(
                "invalid name: use at most 64 letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        try:
            entry = build(name, _Table(value, ctx))
        except _Invalid as exc:
            ctx.error(str(exc))
            continue
        if entry is not None and not ctx.failed_since(mark):
            built[name] = entry
    return built


def _typed(t: _Table, types: tuple[_S, ...]) -> _S | None:
    """The entry's `type`, or None after reporting it (other keys then go unchecked)."""
    t.known.append("type")
    if "type" not in t:
        spelled = ", ".join(f'"{option}"' for option in types)
        t.ctx.child("type").error(f"missing required key (one of {spelled})")
        return None
    return _parse(_choice(types), t.data["type"], t.ctx.child("type"))


def _source(name: str, t: _Table) -> PostgresSource | None:
    if _typed(t, ("postgres",)) is None:
        return None
    values = t.read(_POSTGRES_SCHEMA)
    t.require("dsn")
    t.close()
    return PostgresSource(name=name, **values) if "dsn" in values else None


def _storage(name: str, t: _Table) -> Storage | None:
    kind = _typed(t, ("s3", "filesystem"))
    if kind is None:
        return None
    if kind == "filesystem":
        values = t.read(_FILESYSTEM_SCHEMA)
        t.require("path")
        t.close()
        return FilesystemStorage(name=name, **values) if "path" in values else None
    values = t.read(_S3_SCHEMA)
    t.require("bucket")
    pair = ("access_key_id", "secret_access_key")
    for key, other in (pair, pair[::-1]):
        if key in t and other not in t:
            t.ctx.child(other).error(f"required when {key} is set (give both, or neither)")
    t.close()
    return S3Storage(name=name, **values) if "bucket" in values else None


def _notifier(name: str, t: _Table) -> Notifier | None:
    kind = _typed(t, NOTIFIER_TYPES)
    if kind is None:
        return None
    values = t.read(_NOTIFIER_SCHEMA)
    t.require("url")
    t.close()
    return Notifier(name=name, type=kind, **values) if "url" in values else None


def _job(
    name: str, t: _Table, defaults: _Defaults, daemon: DaemonConfig | None, names: _Names
) -> Job | None:
    own = t.read(_JOB_SCHEMA)
    for key in _REQUIRED_JOB_KEYS:
        if key not in t and key not in defaults.given:
            t.ctx.child(key).error("missing required key")
    _check_references(t.ctx, own, names)
    t.close()
    values = {**defaults.values, **own}
    if "source" not in values or "storage" not in values:
        return None
    values.setdefault("timezone", (daemon or DaemonConfig()).timezone)
    mark = t.ctx.mark()
    _check_physical(t, values, own)  # issue 16
    verify = values.get("verify")
    # A logical drill restores into `target`; a physical one brings its own server.
    if isinstance(verify, VerifyPolicy) and verify.restore and verify.target is None:
        if values.get("kind") != "physical":
            t.ctx.child("verify").child("target").error(
                "required when restore = true (the server where scratch databases are created)"
            )
    if t.ctx.failed_since(mark):
        return None
    if isinstance(verify, VerifyPolicy) and verify.restore and values.get("encryption"):
        t.ctx.child("verify").error(
            "restore = true cannot work on an encrypted job: the daemon holds no private key "
            "(use restore = false here, and `backupd verify --restore --identity FILE` by hand)"
        )
        return None
    return Job(name=name, **values)


def _check_references(ctx: _Ctx, values: Mapping[str, Any], names: _Names) -> None:
    def check(key: str, kind: str, refs: Iterable[str], defined: Collection[str]) -> None:
        for ref in refs:
            if ref not in defined:
                close = difflib.get_close_matches(ref, sorted(defined), n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                ctx.child(key).error(f"unknown {kind} {_describe(ref)}{hint}")

    if "source" in values:
        check("source", "source", [values["source"]], names.sources)
    check("storage", "storage", values.get("storage", ()), names.storages)
    check("notify", "notifier", values.get("notify", ()), names.notifiers)


# --------------------------------------------------------------------------
# Back to TOML (`backupd check --show`)


def _daemon_doc(d: DaemonConfig) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "socket": d.socket,
        "socket_mode": f"{d.socket_mode:04o}",
        "socket_group": d.socket_group,
        "allow_uids": list(d.allow_uids),
        "http_listen": d.http_listen,
        "max_concurrent_jobs": d.max_concurrent_jobs,
        "timezone": d.timezone,
        "shutdown_grace": format_duration(d.shutdown_grace),
        "log_format": d.log_format,
        "log_level": d.log_level,
    }
    return _without_none(doc)


def _source_doc(s: PostgresSource) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": s.type,
        "dsn": s.dsn,
        "password": _secret_doc(s.password),
        "pg_bin_dir": s.pg_bin_dir,
        "max_concurrent": s.max_concurrent,
    }
    return _without_none(doc)


def _storage_doc(s: Storage) -> dict[str, Any]:
    if isinstance(s, FilesystemStorage):
        return {
            "type": s.type,
            "path": s.path,
            "abandoned_upload_grace": format_duration(s.abandoned_upload_grace),
        }
    doc: dict[str, Any] = {
        "type": s.type,
        "bucket": s.bucket,
        "prefix": s.prefix,
        "endpoint_url": s.endpoint_url,
        "region": s.region,
        "access_key_id": _secret_doc(s.access_key_id),
        "secret_access_key": _secret_doc(s.secret_access_key),
        "part_size": format_size(s.part_size),
        "upload_concurrency": s.upload_concurrency,
        "storage_class": s.storage_class,
        "addressing_style": s.addressing_style,
        "checksum": s.checksum,
        "abandoned_upload_grace": format_duration(s.abandoned_upload_grace),
    }
    return _without_none(doc)


def _job_doc(j: Job) -> dict[str, Any]:
    r = j.retention
    retention: dict[str, Any] = {
        "keep_last": r.keep_last,
        "keep_daily": r.keep_daily,
        "keep_weekly": r.keep_weekly,
        "keep_monthly": r.keep_monthly,
        "keep_yearly": r.keep_yearly,
        "max_age": None if r.max_age is None else format_duration(r.max_age),
    }
    verify = None
    if j.verify is not None:
        verify = _without_none(
            {
                "schedule": list(j.verify.schedule),
                "restore": j.verify.restore,
                "target": j.verify.target,
            }
        )
    doc: dict[str, Any] = {
        "source": j.source,
        "databases": list(j.databases),
        "globals": j.globals,
        "storage": list(j.storage),
        "schedule": list(j.schedule),
        "timezone": j.timezone,
        "jitter": format_duration(j.jitter),
        "catch_up": j.catch_up,
        "kind": j.kind,
        "format": j.format,
        "tables": list(j.tables),
        "exclude_tables": list(j.exclude_tables),
        "exclude_table_data": list(j.exclude_table_data),
        "encryption": None
        if j.encryption is None
        else {"recipients": list(j.encryption.recipients)},
        "min_size": format_size(j.min_size),
        "compression": j.compression.spec,
        "timeout": format_duration(j.timeout),
        "notify": list(j.notify),
        "retention": _without_none(retention),
        "verify": verify,
        "retry": {
            "max_attempts": j.retry.max_attempts,
            "initial_delay": format_duration(j.retry.initial_delay),
            "max_delay": format_duration(j.retry.max_delay),
            "multiplier": j.retry.multiplier,
        },
        "wal": None  # kind = "physical" only (issue 16), which has no logical keys
        if j.wal is None
        else _without_none(
            {
                "slot": j.wal.slot or None,
                "max_lag": format_duration(j.wal.max_lag),
                "spool": j.wal.spool or None,
            }
        ),
    }
    if j.kind == "physical":
        for key in _NOT_PHYSICAL:
            doc.pop(key, None)
    return _without_none(doc)


def _notifier_doc(n: Notifier) -> dict[str, Any]:
    return {
        "type": n.type,
        "url": n.url if isinstance(n.url, str) else n.url.reference(),
        "on": list(n.on),
        "timeout": format_duration(n.timeout),
    }


def _secret_doc(secret: Secret | None) -> dict[str, str] | None:
    return None if secret is None else secret.reference()


def _without_none(doc: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in doc.items() if value is not None}
