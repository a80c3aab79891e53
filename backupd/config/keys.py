"""How a config key is declared once and read, checked and shown from that declaration.

A model class in `backupd.config.model` is a `@model` (a frozen, slotted dataclass);
each field that is a TOML key is declared with `key(parser, default=...)`: its
type, its default, the parser that reads and validates it, how `check --show`
prints it, and whether it is a secret. `key()` ties the parser's result type to
the field's type, so a parser returning the wrong type is a mypy error at the
declaration, and `Cls(**values)` built from parsed values is type-correct by
construction. The schema, the error messages with key paths, `--show` and the
secret walk are all derived from `dataclasses.fields()`: adding a key is one
declaration.

Cross-key rules (both S3 keys or neither, `max_delay` >= `initial_delay`...)
are a model's `rules(values, given)` static method, next to the keys they relate.

Pure: no I/O and no imports beyond the standard library.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, Generic, TypeVar, dataclass_transform, overload

_T = TypeVar("_T")
_T_co = TypeVar("_T_co", covariant=True)
_C = TypeVar("_C")


class Invalid(Exception):
    """A value is wrong as a whole; the message says why, without quoting secrets."""


class Reported(Exception):
    """A value could not be built; its errors are already recorded at their paths."""


class Ctx:
    """A position in the document and the shared list of errors found so far."""

    __slots__ = ("errors", "path")

    def __init__(self, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors

    def child(self, key: object) -> Ctx:
        part = key_text(key)
        return Ctx(f"{self.path}.{part}" if self.path else part, self.errors)

    def error(self, message: str) -> None:
        self.errors.append(f"{self.path}: {message}" if self.path else message)

    def mark(self) -> int:
        return len(self.errors)

    def failed_since(self, mark: int) -> bool:
        return len(self.errors) > mark


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key_text(key: object) -> str:
    text = str(key)
    return text if _BARE_KEY.fullmatch(text) else json.dumps(text, ensure_ascii=False)


def describe(value: object) -> str:
    """A value as it would appear in TOML, shortened; never used where a secret may be."""
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 60 else value[:57] + "...", ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 128 else "a huge integer"
    if isinstance(value, float):
        return repr(value)
    return kind(value)


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


def kind(value: object) -> str:
    """A value's TOML type only, for places where the value itself may be a secret."""
    return next((name for k, name in _TOML_KINDS if isinstance(value, k)), "a value")


# --------------------------------------------------------------------------
# Declaring keys


class Parser(Generic[_T_co]):
    """Reads one TOML value at its position (raising `Invalid`), and knows how `--show` prints it.

    `show` is None for values TOML holds as they are (strings, numbers,
    booleans, arrays of those, nested model tables); a duration, a size or a
    secret reference says how it is spelled back.
    """

    __slots__ = ("read", "show")

    def __init__(
        self, read: Callable[[object, Ctx], _T_co], show: Callable[[Any], object] | None = None
    ) -> None:
        self.read = read
        self.show = show

    def __call__(self, value: object, ctx: Ctx) -> _T_co:
        return self.read(value, ctx)


@dataclass(frozen=True, slots=True)
class Key:
    """What a field's metadata holds when the field is a config key."""

    parser: Parser[Any]
    required: bool
    secret: bool  # a reference `check` resolves; never quoted in a message
    ref: str  # "" or the kind of entry the value names ("source", "storage", "notifier")
    show: Callable[[Any], object] | None


_KEY = "backupd.key"


@overload
def key(
    parser: Parser[_T],
    *,
    default: _T,
    secret: bool = ...,
    ref: str = ...,
    show: Callable[[Any], object] | None = ...,
) -> _T: ...
@overload
def key(
    parser: Parser[_T],
    *,
    default_factory: Callable[[], _T],
    secret: bool = ...,
    ref: str = ...,
    show: Callable[[Any], object] | None = ...,
) -> _T: ...
@overload
def key(
    parser: Parser[_T],
    *,
    secret: bool = ...,
    ref: str = ...,
    show: Callable[[Any], object] | None = ...,
) -> _T: ...
def key(
    parser: Parser[Any],
    *,
    default: Any = MISSING,
    default_factory: Any = MISSING,
    secret: bool = False,
    ref: str = "",
    show: Callable[[Any], object] | None = None,
) -> Any:
    """A config key: without a default it is required. `show` overrides the parser's."""
    required = default is MISSING and default_factory is MISSING
    spec = Key(parser, required, secret, ref, show or parser.show)
    return field(default=default, default_factory=default_factory, metadata={_KEY: spec})


@overload
def model(cls: type[_C], /) -> type[_C]: ...
@overload
def model(*, kw_only: bool = False) -> Callable[[type[_C]], type[_C]]: ...
@dataclass_transform(frozen_default=True, field_specifiers=(field, key))
def model(cls: Any = None, /, *, kw_only: bool = False) -> Any:
    """`@dataclass(frozen=True, slots=True)` whose fields may be `key()`s (mypy knows them)."""
    wrap = dataclass(frozen=True, slots=True, kw_only=kw_only)
    return wrap if cls is None else wrap(cls)


_SCHEMAS: dict[type, dict[str, Key]] = {}


def keys_of(cls: type) -> dict[str, Key]:
    """The TOML keys of a model, in declaration order (the order errors are reported in)."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        schema = {f.name: f.metadata[_KEY] for f in dataclasses.fields(cls) if _KEY in f.metadata}
        _SCHEMAS[cls] = schema
    return schema


def _defaults(cls: type) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
    return values


Rules = Callable[[Mapping[str, Any], Collection[str]], Iterable[tuple[str, str]]]


def check_rules(cls: type, values: Mapping[str, Any], given: Collection[str], ctx: Ctx) -> bool:
    """Apply the model's cross-key `rules` to `values` (defaults filled in); False if one failed.

    `rules(values, given)` yields `(key, message)` for each rule broken;
    `given` is every key the table sets, valid or not.
    """
    rules: Rules | None = getattr(cls, "rules", None)
    if rules is None:
        return True
    ok = True
    for name, message in rules({**_defaults(cls), **values}, given):
        where = ctx
        for part in name.split("."):  # "verify.target": a key of a table the model holds
            where = where.child(part)
        where.error(message)
        ok = False
    return ok


# --------------------------------------------------------------------------
# Reading tables


class Table:
    """One TOML table being read: remembers which keys were used to report the rest as unknown."""

    def __init__(self, value: object, ctx: Ctx) -> None:
        if not isinstance(value, dict):
            raise Invalid(f"expected a table, got {describe(value)}")
        self.data: dict[Any, Any] = value
        self.ctx = ctx
        self.known: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def read(self, schema: Mapping[str, Key]) -> dict[str, Any]:
        """Parse every schema key present; return only the values that parsed cleanly."""
        values: dict[str, Any] = {}
        for name, spec in schema.items():
            self.known.append(name)
            if name in self.data:
                ctx = self.ctx.child(name)
                mark = ctx.mark()
                value = parse(spec.parser, self.data[name], ctx)
                if not ctx.failed_since(mark):
                    values[name] = value
        return values

    def close(self) -> None:
        """Report keys no schema claimed, with a hint when one is close to a known key."""
        for name in self.data:
            if name not in self.known:
                close = difflib.get_close_matches(str(name), self.known, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self.ctx.child(name).error(f"unknown key{hint}")


def parse(parser: Callable[[object, Ctx], _T], value: object, ctx: Ctx) -> _T | None:
    try:
        return parser(value, ctx)
    except Invalid as exc:
        ctx.error(str(exc))
        return None
    except Reported:
        return None


def load(cls: type[_C], t: Table, **fixed: Any) -> _C | None:
    """Build `cls` from table `t`: its keys in declaration order, required ones, rules, unknowns.

    Every problem is recorded at its key path; None when a required key is
    missing or invalid (the entry is then left out, its errors kept).
    """
    schema = keys_of(cls)
    values = t.read(schema)
    for name, spec in schema.items():
        if spec.required and name not in t:
            t.ctx.child(name).error("missing required key")
    check_rules(cls, values, t.data, t.ctx)
    t.close()
    if any(spec.required and name not in values for name, spec in schema.items()):
        return None
    return cls(**fixed, **values)


def table(cls: type[_C]) -> Parser[_C]:
    """A key whose value is a table of the model `cls` (retention, retry...)."""

    def read(value: object, ctx: Ctx) -> _C:
        built = load(cls, Table(value, ctx))
        if built is None:
            raise Reported
        return built

    return Parser(read)


# --------------------------------------------------------------------------
# Back to TOML (`backupd check --show`) and the secret walk


def to_toml(obj: object) -> dict[str, Any]:
    """A model's keys as a TOML table, each printed as its declaration says; None is left out."""
    doc: dict[str, Any] = {}
    for name, spec in keys_of(type(obj)).items():
        value = getattr(obj, name)
        if value is not None:
            doc[name] = spec.show(value) if spec.show is not None else _plain(value)
    return doc


def _plain(value: object) -> object:
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_toml(value)
    return value


def secret_values(obj: object, path: str) -> Iterable[tuple[str, object]]:
    """`(key path, value)` of every key declared `secret=True`, nested tables included."""
    for name, spec in keys_of(type(obj)).items():
        value = getattr(obj, name)
        if spec.secret:
            yield f"{path}.{name}", value
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from secret_values(value, f"{path}.{name}")
