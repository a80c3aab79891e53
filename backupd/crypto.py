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
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from backupd.errors import BackupdError

INTRO = b"age-encryption.org/v1\n"
CHUNK = 64 * 1024
TAG = 16
_MAX_HEADER = 1 << 20
_ZERO_NONCE = b"\x00" * 12
_X25519_INFO = b"age-encryption.org/v1/X25519"
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


class DecryptionError(BackupdError):
    """The data cannot be decrypted: wrong identity, not age, or corrupted."""


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
    return X25519PublicKey.from_public_bytes(raw)


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
        keys.append(X25519PrivateKey.from_private_bytes(raw))
    if not keys:
        raise DecryptionError(f"identity file {path} holds no age secret key")
    return keys


def generate_identity() -> tuple[str, str]:
    """A new (secret key, recipient) pair in age's text forms (tests, docs)."""
    key = X25519PrivateKey.generate()
    secret = bech32_encode("age-secret-key-", key.private_bytes_raw()).upper()
    public = bech32_encode("age", key.public_key().public_bytes_raw())
    return secret, public


# --- the format ----------------------------------------------------------------------


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)


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
            eph = X25519PrivateKey.generate()
            share = eph.public_key().public_bytes_raw()
            salt = share + pub.public_bytes_raw()
            wrap = _hkdf(eph.exchange(pub), salt, _X25519_INFO)
            body = ChaCha20Poly1305(wrap).encrypt(_ZERO_NONCE, file_key, None)
            header += b"-> X25519 " + _b64(share) + b"\n" + _b64(body) + b"\n"
        header += b"---"
        mac = hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()
        nonce = os.urandom(16)
        self._pending = header + b" " + _b64(mac) + b"\n" + nonce
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
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

    Every chunk is authenticated before it is returned, and the final one
    carries a flag in its nonce, so a truncated or altered file raises
    DecryptionError instead of yielding a shorter plaintext.
    """

    def __init__(self, identities: list[X25519PrivateKey]) -> None:
        self._identities = identities
        self._aead: ChaCha20Poly1305 | None = None
        self._header = bytearray()
        self._counter = 0
        self._chunks = _Chunker(CHUNK + TAG, self._open)

    def update(self, data: bytes) -> bytes:
        if self._aead is None:
            self._header += data
            if not self._read_header():
                return b""
            data = bytes(self._header)
            self._header = bytearray()
        return self._chunks.feed(data, [])

    def finish(self) -> bytes:
        if self._aead is None:
            raise DecryptionError("not an age file, or truncated inside its header")
        return self._chunks.flush()

    def _read_header(self) -> bool:
        """Parse and check the header once it is complete; False while it is not."""
        buf = self._header
        if not buf.startswith(INTRO[: len(buf)]):
            raise DecryptionError("not an age-encrypted stream (no age header)")
        end = buf.find(b"\n---")
        if end < 0:
            if len(buf) > _MAX_HEADER:
                raise DecryptionError("not an age file: header too large")
            return False
        eol = buf.find(b"\n", end + 4)
        if eol < 0 or len(buf) < eol + 1 + 16:
            return False
        header = bytes(buf[: end + 4])
        if len(header) < len(INTRO) + 3 or buf[end + 4 : end + 5] != b" ":
            raise DecryptionError("malformed age header")
        mac = _unb64_or_fail(bytes(buf[end + 5 : eol]), "header MAC")
        nonce = bytes(buf[eol + 1 : eol + 17])
        file_key = self._unwrap(_stanzas(header[len(INTRO) : end + 1]))
        expected = hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise DecryptionError("age header MAC mismatch: the file is corrupted")
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        del buf[: eol + 17]
        return True

    def _unwrap(self, stanzas: list[tuple[list[bytes], bytes]]) -> bytes:
        x25519 = [(args, body) for args, body in stanzas if args[:1] == [b"X25519"]]
        if not x25519:
            kinds = sorted({a[0].decode(errors="replace") for a, _ in stanzas if a})
            raise DecryptionError(
                "this age file has no X25519 recipient (only: "
                f"{', '.join(kinds) or 'none'}); backupd decrypts X25519 keys only"
            )
        for args, body in x25519:
            if len(args) != 2:
                raise DecryptionError("malformed X25519 stanza in the age header")
            share = _unb64_or_fail(args[1], "X25519 share")
            if len(share) != 32 or len(body) != 32:
                raise DecryptionError("malformed X25519 stanza in the age header")
            for identity in self._identities:
                pub = identity.public_key().public_bytes_raw()
                try:
                    shared = identity.exchange(X25519PublicKey.from_public_bytes(share))
                except ValueError:  # a low-order point: all-zero shared secret
                    raise DecryptionError("invalid X25519 share in the age header") from None
                wrap = _hkdf(shared, share + pub, _X25519_INFO)
                try:
                    file_key = ChaCha20Poly1305(wrap).decrypt(_ZERO_NONCE, body, None)
                except InvalidTag:
                    continue
                if len(file_key) == 16:
                    return file_key
        raise DecryptionError(
            "no identity matches any recipient of this backup (wrong --identity file?)"
        )

    def _open(self, chunk: _Buffer, last: bool) -> bytes:
        assert self._aead is not None
        try:
            plain = self._aead.decrypt(_nonce(self._counter, last), chunk, None)
        except InvalidTag:
            raise DecryptionError(
                "age payload authentication failed: the backup is corrupted or truncated"
            ) from None
        if last and not plain and self._counter > 0:
            raise DecryptionError("age payload ends with an empty chunk: not a valid age file")
        self._counter += 1
        return plain


def _stanzas(text: bytes) -> list[tuple[list[bytes], bytes]]:
    """The recipient stanzas of a header: (arguments, body) each, per the age spec.

    A body is base64 in lines of 64 columns, ended by the first shorter line.
    """
    lines = text.split(b"\n")[:-1]
    stanzas: list[tuple[list[bytes], bytes]] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith(b"-> "):
            raise DecryptionError("malformed age header: expected a recipient stanza")
        args = lines[i][3:].split(b" ")
        body = b""
        i += 1
        while True:
            if i >= len(lines):
                raise DecryptionError("malformed age header: stanza body not terminated")
            line = lines[i]
            i += 1
            body += line
            if len(line) < 64:
                break
        stanzas.append((args, _unb64_or_fail(body, "stanza body")))
    return stanzas


def _unb64_or_fail(data: bytes, what: str) -> bytes:
    try:
        return _unb64(data)
    except ValueError:
        raise DecryptionError(f"malformed age header: {what} is not base64") from None
