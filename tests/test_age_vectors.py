"""The C2SP CCTV age test vectors, run against backupd's age decryptor.

The vectors (github.com/C2SP/CCTV, `age/testdata`, 0BSD/CC0/Unlicense) are
vendored in tests/data/age-vectors/: the 69 that apply to an X25519-only,
armor-free decryptor. The README there names the source commit and the 74
left out (ASCII armor, scrypt passphrases, ML-KEM hybrid keys) and why.

Each vector is decrypted as `restore` does it: identities read from an
identity file with `load_identities`, the file fed to `AgeDecryptor` in
pieces of 4 KiB and in one piece. The outcome must be the one the vector
expects: the exact plaintext (its SHA-256), or a DecryptionError of the
expected kind, and for a payload failure the plaintext released before the
error must be exactly the chunks that authenticated (the vector's hash).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupd.stream.age import AgeDecryptor, DecryptionError, load_identities

VECTORS = Path(__file__).parent / "data" / "age-vectors"
NAMES = sorted(p.name for p in VECTORS.iterdir() if p.name not in {"README.md", "LICENSE"})

# The kind of DecryptionError each expected failure must be (the vectors ask
# that a parse error is not masked as, say, a MAC mismatch).
ERRORS = {
    "header failure": r"^(not an age|malformed age header)",
    "no match": r"^no identity matches any recipient",
    "HMAC failure": r"^age header MAC mismatch",
    "payload failure": r"^age payload",
}


@dataclass(frozen=True)
class Vector:
    expect: str
    payload_sha256: str | None
    identities: list[str]  # the X25519 ones: backupd has no hybrid (ML-KEM) keys
    sealed: bytes


def _load(name: str) -> Vector:
    head, sep, sealed = (VECTORS / name).read_bytes().partition(b"\n\n")
    assert sep, name
    fields: dict[str, list[str]] = {}
    for line in head.decode().splitlines():
        key, _, value = line.partition(": ")
        fields.setdefault(key, []).append(value)
    if fields.get("compressed") == ["zlib"]:
        sealed = zlib.decompress(sealed)
    (expect,) = fields["expect"]
    return Vector(
        expect=expect,
        payload_sha256=fields.get("payload", [None])[0],
        identities=[i for i in fields.get("identity", []) if i.startswith("AGE-SECRET-KEY-1")],
        sealed=sealed,
    )


def test_the_applicable_vectors_are_all_there() -> None:
    assert len(NAMES) == 69
    assert {_load(n).expect for n in NAMES} == {"success", *ERRORS}


@pytest.mark.parametrize("piece", [4096, 0], ids=["4KiB-pieces", "whole"])
@pytest.mark.parametrize("name", NAMES)
def test_cctv_age_vector(name: str, piece: int, tmp_path: Path) -> None:
    vector = _load(name)
    identity_file = tmp_path / "identity.txt"
    identity_file.write_text("".join(f"{i}\n" for i in vector.identities))
    dec = AgeDecryptor(load_identities(identity_file) if vector.identities else [])
    data = vector.sealed
    step = piece or max(len(data), 1)
    released = hashlib.sha256()
    error: DecryptionError | None = None
    try:
        for pos in range(0, len(data), step):
            released.update(dec.update(data[pos : pos + step]))
        released.update(dec.finish())
    except DecryptionError as exc:
        error = exc

    if vector.expect == "success":
        assert error is None, f"{name}: {error}"
        assert released.hexdigest() == vector.payload_sha256
        return
    assert error is not None, f"{name}: decrypted, but the vector expects a {vector.expect}"
    assert re.match(ERRORS[vector.expect], str(error)), f"{name}: {error}"
    if vector.expect == "payload failure":
        # Each chunk is released once it authenticates, as age does, whether the file
        # comes in small pieces or in one: the error is raised by the call after.
        assert released.hexdigest() == vector.payload_sha256
