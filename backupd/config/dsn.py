"""PostgreSQL connection strings: libpq URLs (postgresql://...) and keyword=value strings.

Parsing only, no I/O: which keywords a DSN sets, its host and database, a
copy safe to log (any password removed), and the keyword=value string that
points a DSN at one database.

A database name is never pasted into a URL: libpq would percent-decode it
(`a%41b` is `aAb`) and read anything after a `?` as more parameters, so a
database called `x?host=evil` would send the backup role to another server.
`for_database` quotes the name as one keyword=value value instead, which libpq
takes literally, whatever characters PostgreSQL allowed in it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_DSN_SCHEMES = ("postgresql://", "postgres://")
SECRET_KEYWORDS = frozenset({"password", "sslpassword", "oauth_client_secret"})
SPACE = " \t\n\r\f\v"
PORT_RE = re.compile(r"[0-9]{1,5}")


def dsn_params(dsn: str) -> dict[str, str]:
    """The libpq keywords a DSN sets (URL or keyword=value form), percent-decoded.

    The result may hold a password: never log it. Raises ValueError (without
    quoting the DSN) when libpq could not parse it either.
    """
    if dsn.startswith(_DSN_SCHEMES):
        return _url_params(dsn)
    return {key: value for key, value, _, _ in _scan_keywords(dsn)}


def conninfo(params: dict[str, str]) -> str:
    """libpq keyword=value form of `params`, every value single-quoted and escaped.

    libpq parses this back to exactly `params`: no percent-decoding, no nested
    URL, no value can end early or add a keyword.
    """
    for key in params:
        if not key or any(c in SPACE or c in "='\\" for c in key):
            raise ValueError("invalid connection keyword")
    return " ".join(f"{key}={_quote(value)}" for key, value in params.items())


def for_database(dsn: str, database: str) -> str:
    """The DSN's connection settings pointed at `database`, as a keyword=value string.

    `database` may be any name PostgreSQL allows (quotes, `?`, `%`, `=`, spaces,
    a leading `postgresql://`): it reaches the server unchanged. Raises ValueError
    only for a NUL character, which no PostgreSQL identifier can hold.
    """
    if "\x00" in database:
        raise ValueError("a database name cannot contain a NUL character")
    params = dsn_params(dsn)
    params.pop("dbname", None)
    params["dbname"] = database
    return conninfo(params)


def _quote(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a connection value cannot contain a NUL character")
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def dsn_host(dsn: str) -> str:
    """The host(s) a DSN names (comma-separated, or a socket dir); "" means libpq's default."""
    params = dsn_params(dsn)
    return params.get("host") or params.get("hostaddr") or ""


def redact_dsn(dsn: str) -> str:
    """The DSN without any password, safe for logs and error messages (never raises)."""
    if dsn.startswith(_DSN_SCHEMES):
        return _redact_url(dsn)
    try:
        pairs = _scan_keywords(dsn)
    except ValueError:
        # Unparseable: cut before anything that could start a secret.
        lowered = dsn.lower()
        cuts = [i for i in (lowered.find("password"), lowered.find("secret")) if i >= 0]
        return dsn[: min(cuts)] + "..." if cuts else dsn
    return " ".join(
        dsn[start:end] for key, _, start, end in pairs if key.lower() not in SECRET_KEYWORDS
    )


def _url_params(dsn: str) -> dict[str, str]:
    rest = dsn.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    authority, _, dbname = rest.partition("/")
    params: dict[str, str] = {}
    if "@" in authority:
        userinfo, _, authority = authority.partition("@")
        user, colon, password = userinfo.partition(":")
        if user:
            params["user"] = unquote(user)
        if colon:
            params["password"] = unquote(password)
    hosts: list[str] = []
    ports: list[str] = []
    for part in authority.split(",") if authority else ():
        if part.startswith("["):
            host, bracket, after = part[1:].partition("]")
            if not bracket or (after and not after.startswith(":")):
                raise ValueError("malformed [IPv6] host in the DSN")
            port = after[1:]
        else:
            host, _, port = part.partition(":")
        if port and (PORT_RE.fullmatch(port) is None or not 1 <= int(port) <= 65535):
            raise ValueError("the DSN has an invalid port")
        hosts.append(unquote(host))
        ports.append(port)
    if any(hosts):
        params["host"] = ",".join(hosts)
    if any(ports):
        params["port"] = ",".join(ports)
    if dbname:
        params["dbname"] = unquote(dbname)
    for item in query.split("&") if query else ():
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ValueError("the DSN's query parameters must be key=value")
        params[unquote(key)] = unquote(value)
    return params


def _scan_keywords(dsn: str) -> list[tuple[str, str, int, int]]:
    """libpq's keyword=value syntax: (keyword, value, start, end) for each pair."""
    pairs: list[tuple[str, str, int, int]] = []
    i, n = 0, len(dsn)
    while True:
        while i < n and dsn[i] in SPACE:
            i += 1
        if i == n:
            break
        start = i
        while i < n and dsn[i] != "=" and dsn[i] not in SPACE:
            i += 1
        key = dsn[start:i]
        while i < n and dsn[i] in SPACE:
            i += 1
        if i == n or dsn[i] != "=" or not key:
            raise ValueError("expected a postgresql:// URL or keyword=value pairs")
        i += 1
        while i < n and dsn[i] in SPACE:
            i += 1
        chars: list[str] = []
        if i < n and dsn[i] == "'":
            i += 1
            while True:
                if i == n:
                    raise ValueError("a quoted value in the DSN is not closed")
                if dsn[i] == "\\" and i + 1 < n:
                    chars.append(dsn[i + 1])
                    i += 2
                elif dsn[i] == "'":
                    i += 1
                    break
                else:
                    chars.append(dsn[i])
                    i += 1
        else:
            while i < n and dsn[i] not in SPACE:
                if dsn[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(dsn[i])
                i += 1
        pairs.append((key, "".join(chars), start, i))
    return pairs


def _redact_url(dsn: str) -> str:
    scheme, rest = dsn.split("://", 1)
    head, question, query = rest.partition("?")
    # The last "@" before the query: catches passwords with an unescaped "/" or "@" too.
    userinfo, at, hostpart = head.rpartition("@")
    if at:
        user = userinfo.split(":", 1)[0]
        head = f"{user}@{hostpart}" if user else hostpart
    if question:
        kept = [
            item
            for item in query.split("&")
            if unquote(item.partition("=")[0]).lower() not in SECRET_KEYWORDS
        ]
        query = "&".join(kept)
    return f"{scheme}://{head}" + (f"?{query}" if query else "")
