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
    text = text.strip().lower()
    sep = text.rfind("1")
    if text[:sep] != hrp or sep < 1:
        raise ValueError(f"expected a {hrp!r} key")
    try:
        data = [_BECH32.index(c) for c in text[sep + 1 :]]
    except ValueError:
        raise ValueError("invalid bech32 character") from None
    if len(data) < 6 or _polymod(_hrp_expand(hrp) + data) != 1:
        raise ValueError("bad bech32 checksum")
    return bytes(_convertbits(data[:-6], 5, 8, pad=False))


def bech32_encode(hrp: str, payload: bytes) -> str:
    data = _convertbits(list(payload), 8, 5, pad=True)
    poly = _polymod([*_hrp_expand(hrp), *data, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(poly >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_BECH32[d] for d in data + checksum)


def parse_recipient(text: str) -> X25519PublicKey:
    try:
        raw = bech32_decode(text, "age")
    except ValueError as exc:
        raise BackupdError(f"invalid age recipient {text[:12]}...: {exc}") from None
    if len(raw) != 32:
        raise BackupdError(f"invalid age recipient {text[:12]}...: wrong length")
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
        try:
            raw = bech32_decode(line, "age-secret-key-")
        except ValueError:
            raise DecryptionError(
                f"identity file {path} holds something that is not an age X25519 secret key"
            ) from None
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


class AgeEncryptor:
    """Encoder (see codecs.Encoder) that turns a byte stream into an age file."""

    def __init__(self, recipients: tuple[str, ...] | list[str]) -> None:
        file_key = os.urandom(16)
        header = INTRO
        for text in recipients:
            pub = parse_recipient(text)
            eph = X25519PrivateKey.generate()
            share = eph.public_key().public_bytes_raw()
            salt = share + pub.public_bytes_raw()
            wrap = _hkdf(eph.exchange(pub), salt, _X25519_INFO)
            body = ChaCha20Poly1305(wrap).encrypt(b"\x00" * 12, file_key, None)
            header += b"-> X25519 " + _b64(share) + b"\n" + _b64(body) + b"\n"
        header += b"---"
        mac = hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()
        nonce = os.urandom(16)
        self._pending = header + b" " + _b64(mac) + b"\n" + nonce
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        self._buf = bytearray()
        self._counter = 0

    def update(self, data: bytes) -> bytes:
        self._buf += data
        out = [self._pending]
        self._pending = b""
        view = memoryview(self._buf)
        pos = 0
        while len(self._buf) - pos > CHUNK:  # keep the last chunk back: it is flagged
            out.append(self._seal(bytes(view[pos : pos + CHUNK]), last=False))
            pos += CHUNK
        view.release()
        del self._buf[:pos]
        return b"".join(out)

    def finish(self) -> bytes:
        out = self._pending + self._seal(bytes(self._buf), last=True)
        self._pending = b""
        self._buf.clear()
        return out

    def _seal(self, chunk: bytes, last: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._counter, last), chunk, None)
        self._counter += 1
        return sealed


_STANZA = re.compile(rb"-> X25519 ([A-Za-z0-9+/]+)\n([A-Za-z0-9+/]*)\n")


class AgeDecryptor:
    """Encoder that turns an age file (X25519 recipients) back into the plaintext."""

    def __init__(self, identities: list[X25519PrivateKey]) -> None:
        self._identities = identities
        self._buf = bytearray()
        self._aead: ChaCha20Poly1305 | None = None
        self._counter = 0

    def update(self, data: bytes) -> bytes:
        self._buf += data
        if self._aead is None and not self._read_header():
            return b""
        out = []
        view = memoryview(self._buf)
        pos = 0
        while len(self._buf) - pos > CHUNK + TAG:
            out.append(self._open(bytes(view[pos : pos + CHUNK + TAG]), last=False))
            pos += CHUNK + TAG
        view.release()
        del self._buf[:pos]
        return b"".join(out)

    def finish(self) -> bytes:
        if self._aead is None and not self._read_header():
            raise DecryptionError("not an age file, or truncated before its payload")
        out = self._open(bytes(self._buf), last=True)
        self._buf.clear()
        return out

    def _read_header(self) -> bool:
        if not self._buf.startswith(INTRO[: len(self._buf)]):
            raise DecryptionError("not an age-encrypted stream (no age header)")
        end = self._buf.find(b"\n---")
        if end < 0:
            if len(self._buf) > 1 << 20:
                raise DecryptionError("age header too large")
            return False
        eol = self._buf.find(b"\n", end + 4)
        if eol < 0 or len(self._buf) < eol + 1 + 16:
            return False
        header = bytes(self._buf[: end + 4])
        mac = _unb64(bytes(self._buf[end + 5 : eol]))
        nonce = bytes(self._buf[eol + 1 : eol + 17])
        file_key = self._unwrap(header)
        expected = hmac.new(_hkdf(file_key, b"", b"header"), header, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise DecryptionError("age header MAC mismatch: the file is corrupted")
        self._aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
        del self._buf[: eol + 17]
        return True

    def _unwrap(self, header: bytes) -> bytes:
        for match in _STANZA.finditer(header):
            share = _unb64(match.group(1))
            body = _unb64(match.group(2))
            for identity in self._identities:
                pub = identity.public_key().public_bytes_raw()
                wrap = _hkdf(
                    identity.exchange(X25519PublicKey.from_public_bytes(share)),
                    share + pub,
                    _X25519_INFO,
                )
                try:
                    return ChaCha20Poly1305(wrap).decrypt(b"\x00" * 12, body, None)
                except InvalidTag:
                    continue
        raise DecryptionError(
            "no identity matches any recipient of this backup (wrong --identity file?)"
        )

    def _open(self, sealed: bytes, last: bool) -> bytes:
        assert self._aead is not None
        try:
            plain = self._aead.decrypt(_nonce(self._counter, last), sealed, None)
        except InvalidTag:
            raise DecryptionError(
                "age payload authentication failed: the backup is corrupted or truncated"
            ) from None
        self._counter += 1
        return plain
