"""Streaming age encryption (age-encryption.org/v1, X25519 recipients).

The daemon only needs public keys (`age1...`) to encrypt; `restore`,
`download` and `verify` take an identity file (`AGE-SECRET-KEY-1...`, as
written by `age-keygen`) to decrypt. The output is the standard format:
`age -d -i key.txt` reads it. Implemented on `cryptography`'s primitives so
it streams in 64 KiB chunks with no temp files and no child process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from backupd.errors import BackupdError
from backupd.errors import DecryptionError as DecryptionError  # where it was

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

INTRO = b"age-encryption.org/v1\n"
CHUNK = 64 * 1024
TAG = 16
_MAX_HEADER = 1 << 20
_ZERO_NONCE = b"\x00" * 12
_X25519_INFO = b"age-encryption.org/v1/X25519"
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


@dataclass(frozen=True, slots=True)
class _Primitives:
    InvalidTag: type[Exception]
    hashes: ModuleType
    new_private_key: Callable[[], X25519PrivateKey]
    private_key: Callable[[bytes], X25519PrivateKey]
    public_key: Callable[[bytes], X25519PublicKey]
    ChaCha20Poly1305: type[ChaCha20Poly1305]
    HKDF: type[HKDF]


_CRYPTO: _Primitives | None = None


def _crypto() -> _Primitives:
    """`cryptography`'s primitives, imported on first use: a run that neither encrypts
    nor decrypts does not load them (~8 MB of resident memory, ~40 ms)."""
    global _CRYPTO
    if _CRYPTO is None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import x25519
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        _CRYPTO = _Primitives(
            InvalidTag=InvalidTag,
            hashes=hashes,
            new_private_key=x25519.X25519PrivateKey.generate,
            private_key=x25519.X25519PrivateKey.from_private_bytes,
            public_key=x25519.X25519PublicKey.from_public_bytes,
            ChaCha20Poly1305=ChaCha20Poly1305,
            HKDF=HKDF,
        )
    return _CRYPTO


# --- bech32 (BIP 173), as age encodes its keys ---------------------------------------


def _polymod(values: list[int]) -> int:
    gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i in range(5):
            chk ^= gen[i] if (top >> i) & 1 else 0
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convertbits(data: list[int], frombits: int, tobits: int, pad: bool) -> list[int]:
    acc = bits = 0
    out = []
    maxv = (1 << tobits) - 1
    for value in data:
        acc = (acc << frombits) | value
        bits += frombits
        while bits >= tobits:
            bits -= tobits
            out.append((acc >> bits) & maxv)
    if pad and bits:
        out.append((acc << (tobits - bits)) & maxv)
    elif not pad and (bits >= frombits or (acc << (tobits - bits)) & maxv):
        raise ValueError("invalid padding")
    return out


def bech32_decode(text: str, hrp: str) -> bytes:
    """The payload of a bech32 string with prefix `hrp` (age: no 90-character limit)."""
    text = text.strip()
    if text != text.lower() and text != text.upper():
        raise ValueError("mixed upper and lower case")
    text = text.lower()
    sep = text.rfind("1")
    if sep < 1 or text[:sep] != hrp:
        raise ValueError(f"expected a key starting with {hrp}1")
    try:
        data = [_BECH32.index(c) for c in text[sep + 1 :]]
    except ValueError:
        raise ValueError("invalid bech32 character") from None
    if len(data) < 6 or _polymod(_hrp_expand(hrp) + data) != 1:
        raise ValueError("bad bech32 checksum")
    return bytes(_convertbits(data[:-6], 5, 8, pad=False))


def bech32_encode(hrp: str, payload: bytes) -> str:
    """`payload` as bech32 with prefix `hrp` (lower case)."""
    data = _convertbits(list(payload), 8, 5, pad=True)
    poly = _polymod([*_hrp_expand(hrp), *data, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(poly >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_BECH32[d] for d in data + checksum)


def parse_recipient(text: str) -> X25519PublicKey:
    """An `age1...` public key (it is public: error messages quote it)."""
    try:
        raw = bech32_decode(text, "age")
    except ValueError as exc:
        raise BackupdError(f"invalid age recipient {text!r}: {exc}") from None
    if len(raw) != 32:
        raise BackupdError(f"invalid age recipient {text!r}: not a 32-byte X25519 key")
    return _crypto().public_key(raw)


def load_identities(path: str | Path) -> list[X25519PrivateKey]:
    """Read an age identity file (comments and several keys allowed)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise DecryptionError(f"cannot read identity file {path}: {exc.strerror}") from None
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("age1"):
            raise DecryptionError(
                f"identity file {path} holds an age public key (a recipient); --identity "
                "needs the secret key file written by age-keygen"
            )
        try:
            raw = bech32_decode(line, "age-secret-key-")
        except ValueError:
            # Never quote the line: it may be a damaged secret key.
            raise DecryptionError(
                f"identity file {path} holds something that is not an age X25519 secret key"
            ) from None
        if len(raw) != 32:
            raise DecryptionError(f"identity file {path} holds a secret key of the wrong length")
        keys.append(_crypto().private_key(raw))
    if not keys:
        raise DecryptionError(f"identity file {path} holds no age secret key")
    return keys


def generate_identity() -> tuple[str, str]:
    """A new (secret key, recipient) pair in age's text forms (tests, docs)."""
    key = _crypto().new_private_key()
    secret = bech32_encode("age-secret-key-", key.private_bytes_raw()).upper()
    public = bech32_encode("age", key.public_key().public_bytes_raw())
    return secret, public


# --- the format ----------------------------------------------------------------------


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    c = _crypto()
    return c.HKDF(algorithm=c.hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    """Canonical unpadded base64 only, as age requires (Go's RawStdEncoding.Strict()).

    Anything else (padding, a newline, unused bits that are not zero, a
    character outside the alphabet) would make one header readable in several
    spellings: raises ValueError.
    """
    decoded = base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    if _b64(decoded) != data:
        raise ValueError("not canonical base64")
    return decoded


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


_Buffer = bytes | bytearray | memoryview


class _Chunker:
    """Cuts a byte stream into fixed-size chunks, always holding the last one back.

    age flags the final chunk of the payload (its nonce differs), so a chunk
    can only be processed once more bytes are known to follow it; `flush`
    processes what is held back as the final chunk. Full chunks are taken
    straight from the caller's buffer through a memoryview: the only copies
    are the held-back tail and the join of the output.
    """

    def __init__(self, size: int, process: Callable[[_Buffer, bool], bytes]) -> None:
        self._size = size
        self._process = process
        self._buf = bytearray()

    def feed(self, data: _Buffer, out: list[bytes]) -> bytes:
        """Process every chunk of `data` known not to be the last; returns `out` + results."""
        view = memoryview(data)
        size = self._size
        if self._buf:
            need = size - len(self._buf)
            if len(view) <= need:
                self._buf += view
                return b"".join(out)
            self._buf += view[:need]
            view = view[need:]
            out.append(self._process(self._buf, False))
            self._buf.clear()
        pos = 0
        while len(view) - pos > size:
            out.append(self._process(view[pos : pos + size], False))
            pos += size
        self._buf += view[pos:]
        return b"".join(out)

    def flush(self) -> bytes:
        """Process what is held back as the final chunk (possibly empty)."""
        out = self._process(self._buf, True)
        self._buf.clear()
        return out


class AgeEncryptor:
    """Encoder (see codecs.Encoder) that turns a byte stream into an age file."""

    def __init__(self, recipients: Sequence[str]) -> None:
        if not recipients:
            raise BackupdError("age encryption needs at least one recipient")
        file_key = os.urandom(16)
        header = INTRO
        for text in recipients:
            pub = parse_recipient(text)
            eph = _crypto().new_private_key()
            share = eph.public_key().public_bytes_raw()
            salt = share + pub.public_bytes_raw()
            wrap = _hkdf(eph.exchange(pub), salt, _X25519_INFO)
            body = _crypto().ChaCha20Poly1305(wrap).encrypt(_ZERO_NONCE, file_key, None)
            header += b"-> X25519 " + _b64(share) + b"\n" + _b64(body) + b"\n"
        header += b"---"
        mac = hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()
        nonce = os.urandom(16)
        self._pending = header + b" " + _b64(mac) + b"\n" + nonce
        self._aead = _crypto().ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._counter = 0
        self._chunks = _Chunker(CHUNK, self._seal)

    def update(self, data: bytes) -> bytes:
        out = [self._pending] if self._pending else []
        self._pending = b""
        return self._chunks.feed(data, out)

    def finish(self) -> bytes:
        out = self._pending + self._chunks.flush()
        self._pending = b""
        return out

    def _seal(self, chunk: _Buffer, last: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._counter, last), chunk, None)
        self._counter += 1
        return sealed


class AgeDecryptor:
    """Encoder that turns an age file (X25519 recipients) back into the plaintext.

    The header is parsed as strictly as the reference implementation does
    (canonical base64 everywhere, the stanza grammar, the MAC line), so one
    file has one spelling. Every payload chunk is authenticated before it is
    returned, and the final one carries a flag in its nonce, so a truncated,
    extended or altered file raises DecryptionError instead of yielding a
    shorter or longer plaintext. As age does, a chunk is released as soon as it
    authenticates, and an error found after some chunks of one `update`
    authenticated is raised by the next call (`update` or `finish`).
    The C2SP CCTV age vectors (tests/test_age_vectors.py) are its test suite.
    """

    def __init__(self, identities: list[X25519PrivateKey]) -> None:
        self._identities = identities
        self._aead: ChaCha20Poly1305 | None = None
        self._header = bytearray()
        self._buf = bytearray()  # a partial chunk
        self._counter = 0
        self._done = False  # the final chunk has been read
        self._error: DecryptionError | None = None

    def update(self, data: bytes) -> bytes:
        if self._error is not None:
            raise self._error
        out: list[bytes] = []
        try:
            if self._aead is None:
                self._header += data
                if not self._read_header():
                    return b""
                data = bytes(self._header)
                self._header = bytearray()
            self._feed(memoryview(data), out)
        except DecryptionError as exc:
            self._error = exc  # every later call raises it too
            if not out:
                raise
            # Return what did authenticate first: the next call raises the error.
        return b"".join(out)

    def _feed(self, view: memoryview, out: list[bytes]) -> None:
        if view and self._done:
            raise _trailing_data()
        size = CHUNK + TAG
        if self._buf:
            need = size - len(self._buf)
            if len(view) < need:
                self._buf += view
                return
            self._buf += view[:need]
            view = view[need:]
            out.append(self._open_full(self._buf))
            self._buf.clear()
        pos, end = 0, len(view)
        while end - pos >= size and not self._done:
            out.append(self._open_full(view[pos : pos + size]))
            pos += size
        if pos < end:
            if self._done:
                raise _trailing_data()
            self._buf += view[pos:]

    def finish(self) -> bytes:
        if self._error is not None:
            raise self._error
        if self._aead is None:
            raise DecryptionError("not an age file, or truncated inside its header")
        if self._done:
            return b""
        if not self._buf and self._counter > 0:
            raise DecryptionError(
                "age payload is truncated: its last chunk is missing (the backup is incomplete)"
            )
        # A short (or, for an empty payload, tag-only) last chunk.
        if self._counter > 0 and len(self._buf) == TAG:
            raise DecryptionError("age payload ends with an empty chunk: not a valid age file")
        plain = self._open(self._buf, last=True)
        self._buf.clear()
        self._done = True
        return plain

    def _open_full(self, chunk: _Buffer) -> bytes:
        """A full-size chunk: a middle one, or else (its flag says so) the final one."""
        try:
            return self._open(chunk, last=False)
        except DecryptionError:
            plain = self._open(chunk, last=True)
            self._done = True
            return plain

    def _open(self, chunk: _Buffer, last: bool) -> bytes:
        assert self._aead is not None
        try:
            plain = self._aead.decrypt(_nonce(self._counter, last), chunk, None)
        except _crypto().InvalidTag:
            raise DecryptionError(
                "age payload authentication failed: the backup is corrupted or truncated"
            ) from None
        self._counter += 1
        return plain

    def _read_header(self) -> bool:
        """Parse and check the header once it is complete; False while it is not."""
        buf = self._header
        if not buf.startswith(INTRO[: len(buf)]):
            if buf.startswith(INTRO[:19]):  # "age-encryption.org/"
                raise DecryptionError(
                    "malformed age header: the version line is not age-encryption.org/v1"
                )
            raise DecryptionError("not an age-encrypted stream (no age header)")
        end = buf.find(b"\n---", len(INTRO) - 1)
        if end < 0:
            if len(buf) > _MAX_HEADER:
                raise DecryptionError("not an age file: header too large")
            return False
        eol = buf.find(b"\n", end + 1)
        if eol < 0 or len(buf) < eol + 1 + 16:
            if len(buf) > _MAX_HEADER:
                raise DecryptionError("not an age file: header too large")
            return False
        header = bytes(buf[: end + 4])  # what the MAC covers: up to and including "---"
        footer = bytes(buf[end + 1 : eol]).split(b" ")
        if len(footer) != 2 or footer[0] != b"---":
            raise DecryptionError("malformed age header: bad MAC line")
        mac = _unb64_or_fail(footer[1], "header MAC")
        if len(mac) != 32:
            raise DecryptionError("malformed age header: the MAC is not 32 bytes")
        file_key = self._unwrap(_stanzas(header[len(INTRO) : end + 1]))
        expected = hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise DecryptionError("age header MAC mismatch: the file is corrupted")
        nonce = bytes(buf[eol + 1 : eol + 17])
        self._aead = _crypto().ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        del buf[: eol + 17]
        return True

    def _unwrap(self, stanzas: list[_Stanza]) -> bytes:
        if any(args[0] == b"scrypt" for args, _ in stanzas) and len(stanzas) != 1:
            raise DecryptionError("malformed age header: an scrypt stanza must be the only one")
        x25519 = [_x25519_stanza(args, body) for args, body in stanzas if args[0] == b"X25519"]
        if not x25519:
            kinds = sorted({a[0].decode() for a, _ in stanzas})
            raise DecryptionError(
                "no identity matches any recipient of this backup: it has no X25519 "
                f"recipient (only: {', '.join(kinds) or 'none'}); backupd decrypts "
                "with X25519 keys only"
            )
        for share, body in x25519:
            peer = _crypto().public_key(share)
            for identity in self._identities:
                try:
                    shared = identity.exchange(peer)
                except ValueError:  # a low-order point: all-zero shared secret
                    raise DecryptionError(
                        "malformed age header: an X25519 share is a low-order point"
                    ) from None
                pub = identity.public_key().public_bytes_raw()
                wrap = _hkdf(shared, share + pub, _X25519_INFO)
                try:
                    return _crypto().ChaCha20Poly1305(wrap).decrypt(_ZERO_NONCE, body, None)
                except _crypto().InvalidTag:
                    continue
        raise DecryptionError(
            "no identity matches any recipient of this backup (wrong --identity file?)"
        )


_Stanza = tuple[list[bytes], bytes]  # (type and arguments, body)
_ARGUMENT = re.compile(rb"[\x21-\x7e]+")  # visible ASCII, at least one character
_BODY_LINE = 48  # bytes in a full body line (64 base64 columns)


def _trailing_data() -> DecryptionError:
    return DecryptionError("age payload has data after its final chunk: not a valid age file")


def _stanzas(text: bytes) -> list[_Stanza]:
    """The recipient stanzas of a header (the lines between intro and MAC), per the age spec.

    `-> type [args...]`, each argument visible ASCII and not empty, then a
    body in canonical base64 lines of exactly 64 columns, ended by the first
    shorter line (possibly empty).
    """
    lines = text.split(b"\n")[:-1]
    stanzas: list[_Stanza] = []
    i = 0
    while i < len(lines):
        words = lines[i].split(b" ")
        i += 1
        if words[0] != b"->":
            raise DecryptionError("malformed age header: expected a recipient stanza")
        args = words[1:]
        if not args or not all(_ARGUMENT.fullmatch(a) for a in args):
            raise DecryptionError("malformed age header: bad recipient stanza arguments")
        body = bytearray()
        while True:
            if i >= len(lines):
                raise DecryptionError("malformed age header: stanza body not terminated")
            part = _unb64_or_fail(lines[i], "a stanza body line")
            i += 1
            if len(part) > _BODY_LINE:
                raise DecryptionError("malformed age header: stanza body line too long")
            body += part
            if len(part) < _BODY_LINE:
                break
        stanzas.append((args, bytes(body)))
    return stanzas


def _x25519_stanza(args: list[bytes], body: bytes) -> tuple[bytes, bytes]:
    """(ephemeral share, wrapped file key) of an X25519 stanza, checked for shape."""
    if len(args) != 2:
        raise DecryptionError("malformed age header: an X25519 stanza needs one argument")
    share = _unb64_or_fail(args[1], "an X25519 share")
    if len(share) != 32:
        raise DecryptionError("malformed age header: an X25519 share is not 32 bytes")
    if len(body) != 16 + TAG:
        raise DecryptionError("malformed age header: an X25519 wrapped file key is not 16 bytes")
    return share, body


def _unb64_or_fail(data: bytes, what: str) -> bytes:
    try:
        return _unb64(data)
    except ValueError:
        raise DecryptionError(f"malformed age header: {what} is not canonical base64") from None
