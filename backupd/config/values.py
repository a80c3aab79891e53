"""The kinds of config values: each a `Parser` that reads, validates and prints back one value.

Durations are seconds (float), sizes are bytes (int). Messages never repeat
a secret: a plain string where a secret belongs, or a DSN, is described, not
quoted. The cron and age-key checks import croniter and cryptography only
when a config is read, so the model's many importers do not pay for them.
"""

from __future__ import annotations

import math
import re
import zoneinfo
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal, localcontext
from typing import TypeVar
from urllib.parse import urlsplit

from backupd.config.dsn import PORT_RE, SECRET_KEYWORDS, SPACE, dsn_params
from backupd.config.keys import Ctx, Invalid, Parser, describe, kind
from backupd.errors import BackupdError

_T = TypeVar("_T")
_S = TypeVar("_S", bound=str)

# --------------------------------------------------------------------------
# Durations and sizes: public because the CLI and logs use them too

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
        raise ValueError(f"expected a duration like {_DURATION_EXAMPLES}, got {describe(text)}")
    total = sum(
        (Decimal(match[unit]) * factor for unit, factor in _DURATION_UNITS if match[unit]),
        Decimal(0),
    )
    if total > Decimal(MAX_DURATION):
        raise ValueError(f"a duration must be at most 36500d (100 years), got {describe(text)}")
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
        raise ValueError(f'expected a size like "16MiB", "1GiB" or "512", got {describe(text)}')
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


# --------------------------------------------------------------------------
# Scalars


@Parser
def string(value: object, ctx: Ctx) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {describe(value)}")
    if "\x00" in value:
        raise Invalid("must not contain a NUL character")
    return value


@Parser
def nonempty(value: object, ctx: Ctx) -> str:
    text = string(value, ctx)
    if not text:
        raise Invalid("expected a non-empty string")
    return text


@Parser
def boolean(value: object, ctx: Ctx) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {describe(value)}")
    return value


def integer(minimum: int, maximum: int | None = None) -> Parser[int]:
    what = (
        f"an integer >= {minimum}"
        if maximum is None
        else f"an integer between {minimum} and {maximum}"
    )

    def read(value: object, ctx: Ctx) -> int:
        # TOML booleans are not numbers, though Python's bool is an int.
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            raise Invalid(f"expected {what}, got {describe(value)}")
        return value

    return Parser(read)


def number(minimum: float) -> Parser[float]:
    def read(value: object, ctx: Ctx) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < minimum
        ):
            raise Invalid(f"expected a number >= {minimum}, got {describe(value)}")
        return float(value)

    return Parser(read)


def choice(options: tuple[_S, ...]) -> Parser[_S]:
    def read(value: object, ctx: Ctx) -> _S:
        for option in options:
            if value == option:
                return option
        spelled = ", ".join(f'"{option}"' for option in options)
        raise Invalid(f"expected one of {spelled}, got {describe(value)}")

    return Parser(read)


def array(
    item: Callable[[object, Ctx], _T],
    what: str,
    *,
    single: bool = False,
    unique: bool = False,
    at_least_one: str = "",
) -> Parser[tuple[_T, ...]]:
    """An array of `item`s; `single` also takes one bare string; errors name the bad items."""

    def read(value: object, ctx: Ctx) -> tuple[_T, ...]:
        if single and isinstance(value, str):
            raw: list[object] = [value]
        elif isinstance(value, list):
            raw = value
        else:
            raise Invalid(f"expected {what}, got {describe(value)}")
        if at_least_one and not raw:
            raise Invalid(at_least_one)
        items: list[_T] = []
        for element in raw:
            try:
                items.append(item(element, ctx))
            except Invalid as exc:
                ctx.error(str(exc))
        if unique:
            for x in dict.fromkeys(x for i, x in enumerate(items) if x in items[:i]):
                ctx.error(f"{describe(x)} is listed more than once")
        return tuple(items)

    return Parser(read)


def duration(*, positive: bool = False) -> Parser[float]:
    def read(value: object, ctx: Ctx) -> float:
        if not isinstance(value, str):
            raise Invalid(
                f"expected a duration string like {_DURATION_EXAMPLES}, got {describe(value)}"
            )
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if positive and seconds <= 0:
            raise Invalid(f"expected a duration > 0, got {describe(value)}")
        return seconds

    return Parser(read, show=format_duration)


positive_duration = duration(positive=True)


def _optional_max_age(value: object, ctx: Ctx) -> float | None:
    """A retention age limit; "" means none."""
    return None if value == "" else positive_duration(value, ctx)


optional_max_age = Parser(_optional_max_age, show=format_duration)


def size(minimum: int = 0, maximum: int | None = None) -> Parser[int]:
    def read(value: object, ctx: Ctx) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            n = value
        elif isinstance(value, str):
            try:
                n = parse_size(value)
            except ValueError as exc:
                raise Invalid(str(exc)) from None
        else:
            raise Invalid(f'expected a size like "16MiB", "1GiB" or "512", got {describe(value)}')
        if n < minimum or (maximum is not None and n > maximum):
            bounds = (
                f"at least {format_size(minimum)}"
                if maximum is None
                else f"between {format_size(minimum)} and {format_size(maximum)}"
            )
            raise Invalid(f"expected a size {bounds}, got {describe(value)}")
        return n

    return Parser(read, show=format_size)


# --------------------------------------------------------------------------
# Schedules, zones, paths, addresses


def validate_cron(expr: str) -> str | None:
    """Return why `expr` is not a valid 5- or 6-field (seconds first) cron expression, or None."""
    from croniter import CroniterBadDateError, croniter  # only when a config is read

    fields = expr.split()
    if len(fields) not in (5, 6):
        return f"expected 5 fields, or 6 with seconds first, got {len(fields)}"
    try:
        cron = croniter(expr, datetime(2000, 1, 1), second_at_beginning=len(fields) == 6)
    except (ValueError, KeyError) as exc:
        return str(exc) or "invalid cron expression"
    try:
        cron.get_next(datetime)
    except CroniterBadDateError:
        return "matches no date (such as February 30)"
    return None


def _cron(value: object, ctx: Ctx) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a cron expression string, got {describe(value)}")
    problem = validate_cron(value)
    if problem is not None:
        raise Invalid(f"invalid cron expression {describe(value)}: {problem}")
    return value


_cron_list = array(_cron, "a cron expression or an array of them", single=True)


@Parser
def schedule(value: object, ctx: Ctx) -> tuple[str, ...]:
    """One cron expression or several; "" means none (manual runs only)."""
    if value == "":
        return ()
    return _cron_list(value, ctx)


@Parser
def timezone(value: object, ctx: Ctx) -> str:
    name = string(value, ctx)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise Invalid(
            f'unknown time zone {describe(name)} (expected an IANA name like "Europe/Berlin")'
        ) from None
    return name


@Parser
def absolute_path(value: object, ctx: Ctx) -> str:
    path = string(value, ctx)
    if not path.startswith("/"):
        raise Invalid(f"expected an absolute path, got {describe(path)}")
    return path


@Parser
def optional_absolute_path(value: object, ctx: Ctx) -> str:
    return "" if value == "" else absolute_path(value, ctx)


_MAX_SOCKET_PATH = 107  # sizeof(sun_path) - 1 on Linux


@Parser
def socket_path(value: object, ctx: Ctx) -> str:
    path = absolute_path(value, ctx)
    if len(path.encode("utf-8", "surrogatepass")) > _MAX_SOCKET_PATH:
        raise Invalid(f"a Unix socket path can be at most {_MAX_SOCKET_PATH} bytes long")
    return path


def _socket_mode(value: object, ctx: Ctx) -> int:
    if (
        not isinstance(value, str)
        or not re.fullmatch(r"[0-7]{3,4}", value)
        or int(value, 8) > 0o777
    ):
        raise Invalid(f'expected an octal mode string like "0660", got {describe(value)}')
    return int(value, 8)


socket_mode = Parser(_socket_mode, show=lambda mode: f"{mode:04o}")


_SLOT = re.compile(r"[a-z0-9_]{1,63}")


@Parser
def slot_name(value: object, ctx: Ctx) -> str:
    """A physical replication slot's name, as PostgreSQL allows it ("": backupd_{job})."""
    name = string(value, ctx)
    if name and not _SLOT.fullmatch(name):
        raise Invalid(
            f"a replication slot name is 1-63 lowercase letters, digits and _, got {describe(name)}"
        )
    return name


_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@Parser
def node_name(value: object, ctx: Ctx) -> str:
    """`[daemon] node`: "" (the host name) or a short name safe in logs and objects."""
    text = string(value, ctx)
    if text and _NODE.fullmatch(text) is None:
        raise Invalid(
            "a node name is at most 64 letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return text


@Parser
def optional_name(value: object, ctx: Ctx) -> str | None:
    return string(value, ctx) or None


@Parser
def listen_address(value: object, ctx: Ctx) -> str:
    text = string(value, ctx)
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
        raise Invalid(
            'expected "HOST:PORT" like "127.0.0.1:9187" or "[::1]:9187", '
            f'or "" to turn HTTP off, got {describe(text)}'
        )
    return text


@Parser
def http_url(value: object, ctx: Ctx) -> str:
    """An http(s) URL; the value is not quoted in errors since URLs can carry tokens."""
    url = string(value, ctx)
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok or any(c in url for c in SPACE):
        raise Invalid("expected an http:// or https:// URL")
    return url


@Parser
def optional_http_url(value: object, ctx: Ctx) -> str:
    return "" if value == "" else http_url(value, ctx)


# --------------------------------------------------------------------------
# Names, DSNs, keys


_database_list = array(nonempty, "an array of database names", unique=True)


@Parser
def databases(value: object, ctx: Ctx) -> tuple[str, ...]:
    listed = _database_list(value, ctx)
    if "*" in listed and len(listed) > 1:
        raise Invalid('"*" (every database) cannot be combined with database names')
    return listed


names = array(nonempty, "a name or an array of names", single=True, unique=True)
table_patterns = array(nonempty, "an array of table patterns")


def dsn(password_hint: str) -> Parser[str]:
    def read(value: object, ctx: Ctx) -> str:
        # Never quote the DSN back: it may hold a password.
        if not isinstance(value, str):
            raise Invalid(
                f"expected a postgresql:// URL or keyword=value string, got {kind(value)}"
            )
        if "\x00" in value:
            raise Invalid("must not contain a NUL character")
        if not value.strip():
            raise Invalid("expected a postgresql:// URL or keyword=value string, got nothing")
        try:
            params = dsn_params(value)
        except ValueError as exc:
            raise Invalid(f"invalid DSN: {exc}") from None
        for key, secret in params.items():
            keyword = key.lower()
            if keyword in SECRET_KEYWORDS and secret:
                fix = password_hint if keyword == "password" else "remove it"
                raise Invalid(
                    f"the DSN contains a {keyword}; secrets do not belong in the config file: {fix}"
                )
        return value

    return Parser(read)


def _recipient(value: object, ctx: Ctx) -> str:
    from backupd.stream.age import parse_recipient  # cryptography: only when a config is read

    if isinstance(value, str) and value.strip().upper().startswith("AGE-SECRET-KEY-"):
        # Never quote it back: the key is in the config file, so treat it as exposed.
        raise Invalid(
            "this is an age SECRET key: only public keys (age1..., from "
            "`age-keygen -y KEYFILE`) belong here; treat this key as exposed and make a new one"
        )
    if not isinstance(value, str) or not value.startswith("age1") or not value.isascii():
        raise Invalid(f'expected an age public key starting with "age1", got {describe(value)}')
    try:
        parse_recipient(value)
    except BackupdError:
        raise Invalid(f"not a valid age public key: {describe(value)}") from None
    return value


recipients = array(
    _recipient,
    "an array of age public keys",
    unique=True,
    at_least_one="expected at least one age public key",
)


@Parser
def s3_prefix(value: object, ctx: Ctx) -> str:
    prefix = string(value, ctx)
    if prefix.startswith("/"):
        raise Invalid(f'S3 keys do not start with "/", got {describe(prefix)}')
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


@Parser
def bucket(value: object, ctx: Ctx) -> str:
    name = nonempty(value, ctx)
    if "/" in name or any(c in name for c in SPACE):
        raise Invalid(f"not a bucket name: {describe(name)}")
    return name
