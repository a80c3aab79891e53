"""The config file: TOML -> `backupd.config.model`'s frozen dataclasses; errors with key paths.

Loading has no side effects beyond reading the file: secrets stay references
(`Secret`) until a run resolves them. The keys of each table, their parsers
and how `check --show` prints them come from the declarations in
`backupd.config.model`; what is left here is the file and its sections: `[daemon]`,
`[defaults]` for every job, named entries whose `type` chooses their class,
and references between sections.

Validation collects every problem before giving up, so `backupd check` can
show an operator all of them at once, each as "dotted.key.path: message".
Messages never repeat a secret: a plain string where a secret belongs, or a
DSN, is described, not quoted.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import tomli_w

from backupd.config.keys import (
    Ctx,
    Invalid,
    Table,
    check_rules,
    describe,
    keys_of,
    load,
    parse,
    to_toml,
)
from backupd.config.model import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    NOT_PHYSICAL,
    NOTIFIER_TYPES,
    Config,
    DaemonConfig,
    FilesystemStorage,
    Job,
    Notifier,
    PostgresSource,
    S3Storage,
    Storage,
    WalPolicy,
    parse_compression,
    sections,
)
from backupd.config.values import (
    MAX_DURATION,
    choice,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)
from backupd.errors import ConfigError

__all__ = [
    "MAX_DURATION",
    "config_path",
    "config_to_toml",
    "format_duration",
    "format_size",
    "load_config",
    "parse_compression",
    "parse_config",
    "parse_duration",
    "parse_size",
]

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
    notify), entries as in the file, each entry's keys in declaration order, then
    the rules across keys, unknown keys last.
    """
    errors: list[str] = []
    root_ctx = Ctx("", errors)
    if not isinstance(data, dict):
        raise ConfigError([f"the config must be a table, got {describe(data)}"])
    root = Table(data, root_ctx)
    names = {entry: _section_names(data, section) for _, section, entry in sections() if entry}
    daemon = _daemon(root)
    defaults = _defaults(root, names)
    sources = _entities(root, "source", _typed_entry({"postgres": PostgresSource}))
    storages: dict[str, Storage] = _entities(
        root, "storage", _typed_entry({"s3": S3Storage, "filesystem": FilesystemStorage})
    )
    if daemon is not None and daemon.ha.storage and daemon.ha.storage not in names["storage"]:
        root_ctx.child("daemon").child("ha").child("storage").error(
            f"unknown storage {describe(daemon.ha.storage)}"
        )
    jobs = _entities(root, "job", lambda name, t: _job(name, t, defaults, daemon, names))
    notifiers = _entities(root, "notify", _typed_entry(dict.fromkeys(NOTIFIER_TYPES, Notifier)))
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

    Each key is printed as its declaration says. Loading the output again gives
    an equal Config.
    """
    doc: dict[str, Any] = {}
    for attr, section, _ in sections():
        value = getattr(cfg, attr)
        if not isinstance(value, dict):
            doc[section] = to_toml(value)
        elif value:
            doc[section] = {name: _entry_toml(entry) for name, entry in value.items()}
    return tomli_w.dumps(doc)


def _entry_toml(entry: object) -> dict[str, Any]:
    kind = getattr(entry, "type", None)  # a typed entry's class comes from its `type`
    doc = to_toml(entry) if kind is None else {"type": kind, **to_toml(entry)}
    if isinstance(entry, Job):
        if entry.kind == "physical":
            for key in NOT_PHYSICAL:  # a physical job has no logical keys to print back
                doc.pop(key, None)
        else:
            doc.pop("wal", None)
    return doc


def _toml_syntax_error(path: str, exc: tomllib.TOMLDecodeError) -> str:
    reason = str(exc)
    where = re.search(r" \(at line (\d+), column (\d+)\)$", reason)
    if where is None:
        return f"{path}: invalid TOML: {reason}"
    return f"{path}:{where[1]}:{where[2]}: invalid TOML: {reason[: where.start()]}"


# --------------------------------------------------------------------------
# Sections

_T = TypeVar("_T")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_Names = Mapping[str, frozenset[str]]  # what an entry is called -> names defined in the file


@dataclass(frozen=True, slots=True)
class _Defaults:
    values: dict[str, Any]  # job keys from [defaults] that parsed cleanly
    given: frozenset[str]  # every job key [defaults] sets, valid or not


def _section_names(data: Mapping[str, Any], section: str) -> frozenset[str]:
    value = data.get(section)
    return frozenset(str(name) for name in value) if isinstance(value, dict) else frozenset()


def _sub_table(root: Table, key: str) -> Table | None:
    root.known.append(key)
    if key not in root:
        return None
    try:
        return Table(root.data[key], root.ctx.child(key))
    except Invalid as exc:
        root.ctx.child(key).error(str(exc))
        return None


def _daemon(root: Table) -> DaemonConfig | None:
    t = _sub_table(root, "daemon")
    if t is None:
        return DaemonConfig()
    mark = t.ctx.mark()
    daemon = load(DaemonConfig, t)
    return None if t.ctx.failed_since(mark) else daemon


def _defaults(root: Table, names: _Names) -> _Defaults:
    t = _sub_table(root, "defaults")
    if t is None:
        return _Defaults({}, frozenset())
    schema = keys_of(Job)
    values = t.read(schema)
    _check_references(t.ctx, values, names)
    t.close()
    return _Defaults(values, frozenset(k for k in t.data if k in schema))


def _entities(root: Table, section: str, build: Callable[[str, Table], _T | None]) -> dict[str, _T]:
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
            entry = build(name, Table(value, ctx))
        except Invalid as exc:
            ctx.error(str(exc))
            continue
        if entry is not None and not ctx.failed_since(mark):
            built[name] = entry
    return built


def _typed_entry(classes: Mapping[str, type[_T]]) -> Callable[[str, Table], _T | None]:
    """An entry whose `type` chooses its class; without a valid type its other keys go unchecked."""
    types = tuple(classes)

    def build(name: str, t: Table) -> _T | None:
        t.known.append("type")
        if "type" not in t:
            spelled = ", ".join(f'"{option}"' for option in types)
            t.ctx.child("type").error(f"missing required key (one of {spelled})")
            return None
        kind = parse(choice(types), t.data["type"], t.ctx.child("type"))
        if kind is None:
            return None
        return load(classes[kind], t, name=name, type=kind)

    return build


def _job(
    name: str, t: Table, defaults: _Defaults, daemon: DaemonConfig | None, names: _Names
) -> Job | None:
    schema = keys_of(Job)
    own = t.read(schema)
    required = [key for key, spec in schema.items() if spec.required]
    for key in required:
        if key not in t and key not in defaults.given:
            t.ctx.child(key).error("missing required key")
    _check_references(t.ctx, own, names)
    t.close()
    values = {**defaults.values, **own}
    if any(key not in values for key in required):
        return None
    if values.get("kind") == "physical":  # logical keys from [defaults] do not apply to it
        for key in NOT_PHYSICAL:
            if key not in own:
                values.pop(key, None)
        values.setdefault("wal", WalPolicy())
    values.setdefault("timezone", (daemon or DaemonConfig()).timezone)
    if not check_rules(Job, values, t.data, t.ctx):
        return None
    return Job(name=name, **values)


def _check_references(ctx: Ctx, values: Mapping[str, Any], names: _Names) -> None:
    """Each key declared `ref=` names entries that exist (with a hint for a near miss)."""
    for key, spec in keys_of(Job).items():
        if not spec.ref or key not in values:
            continue
        refs = values[key]
        defined = names[spec.ref]
        for ref in [refs] if isinstance(refs, str) else refs:
            if ref not in defined:
                close = difflib.get_close_matches(ref, sorted(defined), n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                ctx.child(key).error(f"unknown {spec.ref} {describe(ref)}{hint}")
