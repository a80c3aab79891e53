"""Issue 6 acceptance: age encryption that the standard `age` CLI reads, both ways.

Keys come from Debian's `age-keygen`; the stored objects are decrypted with
`age -d -i key | zstd -d | pg_restore` exactly as an operator would, without
backupd, and through `backupd restore/download/verify --identity`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from backupd.config.file import load_config
from backupd.errors import BackupdError, ConfigError
from backupd.stream.age import (
    CHUNK,
    AgeDecryptor,
    AgeEncryptor,
    DecryptionError,
    bech32_decode,
    bech32_encode,
    generate_identity,
    load_identities,
    parse_recipient,
)
from tests.configs import ConfigFile
from tests.helpers import run_cli
from tests.pgcluster import PG_BIN, PgCluster

SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5_000_000]


@dataclass(frozen=True)
class AgeKey:
    path: Path  # the identity file written by age-keygen
    recipient: str  # its age1... public key


def _keygen(path: Path) -> AgeKey:
    subprocess.run(["age-keygen", "-o", str(path)], check=True, capture_output=True)
    public = subprocess.run(
        ["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    return AgeKey(path, public)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[AgeKey, AgeKey, AgeKey]:
    """Two recipients of the backups, and a third key that is not one."""
    return (
        _keygen(tmp_path / "key-a.txt"),
        _keygen(tmp_path / "key-b.txt"),
        _keygen(tmp_path / "key-other.txt"),
    )


def _pieces(data: bytes, seed: int) -> list[bytes]:
    """`data` cut at irregular places, as a pipe and a compressor hand it over."""
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(data):
        step = rng.choice([1, 7, CHUNK - 3, CHUNK, CHUNK + 5, 1 << 20])
        out.append(data[pos : pos + step])
        pos += step
    return out


def _encrypt(data: bytes, recipients: list[str]) -> bytes:
    enc = AgeEncryptor(recipients)
    return b"".join(enc.update(p) for p in _pieces(data, len(data))) + enc.finish()


def _decrypt(data: bytes, identity: Path) -> bytes:
    dec = AgeDecryptor(load_identities(identity))
    return b"".join(dec.update(p) for p in _pieces(data, len(data) + 1)) + dec.finish()


def _age_cli(*args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["age", *args], input=data, capture_output=True, timeout=60)


# --- the format, against the age CLI -------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_our_encryption_decrypts_with_age_cli(size: int, keys: tuple[AgeKey, ...]) -> None:
    plain = os.urandom(size)
    sealed = _encrypt(plain, [keys[0].recipient, keys[1].recipient])
    for key in keys[:2]:
        out = _age_cli("-d", "-i", str(key.path), data=sealed)
        assert out.returncode == 0, out.stderr
        assert out.stdout == plain


@pytest.mark.parametrize("size", SIZES)
def test_age_cli_encryption_decrypts_with_ours(size: int, keys: tuple[AgeKey, ...]) -> None:
    plain = os.urandom(size)
    out = _age_cli("-r", keys[0].recipient, "-r", keys[1].recipient, data=plain)
    assert out.returncode == 0, out.stderr
    assert _decrypt(out.stdout, keys[0].path) == plain
    assert _decrypt(out.stdout, keys[1].path) == plain


def test_a_key_that_is_no_recipient_cannot_decrypt(keys: tuple[AgeKey, ...]) -> None:
    sealed = _encrypt(b"payload", [keys[0].recipient])
    with pytest.raises(DecryptionError, match="no identity matches any recipient"):
        _decrypt(sealed, keys[2].path)


def _cuts_and_flips(sealed: bytes) -> list[tuple[str, bytes]]:
    header_end = sealed.index(b"\n---") + 1
    payload = sealed.index(b"\n", header_end) + 1 + 16  # after the MAC line and the nonce
    last_chunk = (len(sealed) - payload) % (CHUNK + 16) or CHUNK + 16
    cases = [
        ("empty", b""),
        ("inside the intro", sealed[:10]),
        ("inside the header", sealed[: header_end - 5]),
        ("header only", sealed[:payload]),
        ("inside the first chunk", sealed[: payload + 1000]),
        ("last chunk dropped", sealed[: len(sealed) - last_chunk]),
        ("one byte short", sealed[:-1]),
        ("garbage appended", sealed + b"\x00" * 20),
        ("a chunk appended", sealed + sealed[payload : payload + CHUNK + 16]),
    ]
    for name, pos in [
        ("intro", 3),
        ("recipient stanza", 40),
        ("header MAC", header_end + 6),
        ("payload nonce", payload - 3),
        ("first chunk", payload + 5),
        ("last byte", len(sealed) - 1),
    ]:
        flipped = bytearray(sealed)
        flipped[pos] ^= 0x01
        cases.append((f"bit flipped in the {name}", bytes(flipped)))
    return cases


def test_truncated_or_altered_files_fail_authentication(keys: tuple[AgeKey, ...]) -> None:
    plain = os.urandom(3 * CHUNK + 100)
    sealed = _encrypt(plain, [keys[0].recipient])
    assert _decrypt(sealed, keys[0].path) == plain
    for name, damaged in _cuts_and_flips(sealed):
        with pytest.raises(DecryptionError):
            _decrypt(damaged, keys[0].path)
            pytest.fail(f"{name}: decrypted without an error")
        # The reference implementation agrees that each of them is broken.
        assert _age_cli("-d", "-i", str(keys[0].path), data=damaged).returncode != 0, name


def test_not_an_age_file_is_named_as_such(keys: tuple[AgeKey, ...]) -> None:
    with pytest.raises(DecryptionError, match="not an age-encrypted stream"):
        _decrypt(b"\x28\xb5\x2f\xfd" + b"zstd frame, not age" * 10, keys[0].path)


# --- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 20, 32, 64])
def test_bech32_round_trip(length: int) -> None:
    payload = os.urandom(length)
    assert bech32_decode(bech32_encode("age", payload), "age") == payload
    upper = bech32_encode("age-secret-key-", payload).upper()
    assert bech32_decode(upper, "age-secret-key-") == payload


def test_bech32_refuses_a_bad_checksum_mixed_case_and_the_wrong_prefix(
    keys: tuple[AgeKey, ...],
) -> None:
    good = keys[0].recipient
    last = good[-1]
    bad = good[:-1] + ("q" if last != "q" else "p")
    with pytest.raises(ValueError, match="bad bech32 checksum"):
        bech32_decode(bad, "age")
    with pytest.raises(ValueError, match="mixed upper and lower case"):
        bech32_decode(good[:10] + good[10:].upper(), "age")
    with pytest.raises(ValueError, match="expected a key starting with age1"):
        bech32_decode("bc1" + good[4:], "age")
    with pytest.raises(ValueError, match="invalid bech32 character"):
        bech32_decode(good[:-1] + "b", "age")


def test_our_key_encoding_matches_age_keygen(tmp_path: Path, keys: tuple[AgeKey, ...]) -> None:
    # A key written by age-keygen decodes to the public key age-keygen derives from it.
    (identity,) = load_identities(keys[0].path)
    assert bech32_encode("age", identity.public_key().public_bytes_raw()) == keys[0].recipient
    # And a key we generate is one age-keygen and age accept.
    secret, public = generate_identity()
    path = tmp_path / "generated.txt"
    path.write_text(f"# a comment, as age-keygen writes\n{secret}\n")
    derived = subprocess.run(
        ["age-keygen", "-y", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert derived == public
    sealed = _age_cli("-r", public, data=b"hello").stdout
    assert _age_cli("-d", "-i", str(path), data=sealed).stdout == b"hello"


def test_recipient_errors_are_clear(tmp_path: Path, keys: tuple[AgeKey, ...]) -> None:
    good = keys[0].recipient
    bad = good[:-1] + ("q" if good[-1] != "q" else "p")
    with pytest.raises(BackupdError, match=f"invalid age recipient '{bad}': bad bech32 checksum"):
        parse_recipient(bad)
    with pytest.raises(BackupdError, match="at least one recipient"):
        AgeEncryptor([])

    cfg = tmp_path / "b.toml"
    cfg.write_text(
        '[source.main]\ntype = "postgres"\ndsn = "host=db1"\n'
        '[storage.local]\ntype = "filesystem"\npath = "/tmp/x"\n'
        f'[job.app]\nsource = "main"\nstorage = ["local"]\n'
        f'encryption = {{ recipients = ["{good}", "{bad}", "ssh-ed25519 AAAAC3Nz"] }}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.errors == [
        f'job.app.encryption.recipients: not a valid age public key: "{bad[:57]}..."',
        "job.app.encryption.recipients: expected an age public key starting with "
        '"age1", got "ssh-ed25519 AAAAC3Nz"',
    ]


def test_identity_file_errors_are_clear_and_never_quote_the_key(
    tmp_path: Path, keys: tuple[AgeKey, ...]
) -> None:
    with pytest.raises(DecryptionError, match=r"cannot read identity file .*missing\.txt"):
        load_identities(tmp_path / "missing.txt")
    public = tmp_path / "public.txt"
    public.write_text(keys[0].recipient + "\n")
    with pytest.raises(DecryptionError, match=r"holds an age public key .*age-keygen"):
        load_identities(public)
    secret = keys[0].path.read_text().splitlines()[-1]
    # Another last character (its bech32 checksum fails): never the one it had.
    damaged_key = secret[:-1] + ("Q" if secret[-1] != "Q" else "P")
    damaged = tmp_path / "damaged.txt"
    damaged.write_text(damaged_key + "\n")
    with pytest.raises(DecryptionError, match="not an age X25519 secret key") as info:
        load_identities(damaged)
    assert damaged_key[16:] not in str(info.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n")
    with pytest.raises(DecryptionError, match="holds no age secret key"):
        load_identities(empty)


# --- encrypted backups, end to end -------------------------------------------------------


@dataclass(frozen=True)
class EncryptedBackup:
    config: Path
    manifest: dict  # type: ignore[type-arg]
    manifest_file: Path
    object_file: Path


@pytest.fixture
def encrypted_backup(
    tmp_path: Path,
    pg: PgCluster,
    sample_db: str,
    config_file: ConfigFile,
    keys: tuple[AgeKey, AgeKey, AgeKey],
) -> EncryptedBackup:
    fs = tmp_path / "store"
    cfg = config_file(
        sample_db,
        extra_job=(
            f'encryption = {{ recipients = ["{keys[0].recipient}", "{keys[1].recipient}"] }}\n'
        ),
    )
    out = run_cli("backup", "app", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    (manifest,) = json.loads(run_cli("list", "app", "-c", str(cfg), "--json").stdout)
    (obj,) = manifest["objects"]
    (object_file,) = fs.rglob(Path(obj["key"]).name)
    (manifest_file,) = fs.rglob("*.manifest.json")
    return EncryptedBackup(cfg, manifest, manifest_file, object_file)


def _new_db(pg: PgCluster) -> str:
    name = "restored_" + uuid.uuid4().hex[:8]
    pg.createdb(name)
    return name


def test_encrypted_backup_restores_with_age_zstd_and_pg_restore_for_either_key(
    pg: PgCluster, sample_db: str, keys: tuple[AgeKey, ...], encrypted_backup: EncryptedBackup
) -> None:
    obj = encrypted_backup.object_file
    assert obj.name == f"{sample_db}.dump.zst.age"
    for key in keys[:2]:
        target = _new_db(pg)
        # The operator's pipeline, without backupd.
        subprocess.run(
            [
                "bash",
                "-o",
                "pipefail",
                "-c",
                'age -d -i "$1" "$2" | zstd -d | "$3" --exit-on-error -d "$4"',
                "restore",
                str(key.path),
                str(obj),
                str(PG_BIN / "pg_restore"),
                pg.dsn(target),
            ],
            env=pg.env(),
            check=True,
            capture_output=True,
            timeout=60,
        )
        assert pg.row_counts(target) == pg.row_counts(sample_db)
        assert pg.schema(target) == pg.schema(sample_db)
        pg.dropdb(target)


def test_encrypted_backup_restores_downloads_and_verifies_with_identity(
    tmp_path: Path,
    pg: PgCluster,
    sample_db: str,
    keys: tuple[AgeKey, ...],
    encrypted_backup: EncryptedBackup,
) -> None:
    cfg = str(encrypted_backup.config)
    target = _new_db(pg)
    out = run_cli(
        "restore",
        "app",
        "-c",
        cfg,
        "--to",
        pg.dsn(target),
        "--identity",
        str(keys[1].path),
        env={"PGPASSWORD": pg.password},
    )
    assert out.returncode == 0, out.stderr
    assert pg.row_counts(target) == pg.row_counts(sample_db)
    pg.dropdb(target)

    dump = tmp_path / "app.dump"
    out = run_cli("download", "app", "-c", cfg, "-o", str(dump), "--identity", str(keys[0].path))
    assert out.returncode == 0, out.stderr
    by_cli = subprocess.run(
        [
            *("bash", "-o", "pipefail", "-c", 'age -d -i "$1" "$2" | zstd -d', "download"),
            *(str(keys[0].path), str(encrypted_backup.object_file)),
        ],
        check=True,
        capture_output=True,
    ).stdout
    assert dump.read_bytes() == by_cli and by_cli.startswith(b"PGDMP")

    out = run_cli("verify", "app", "-c", cfg, "--identity", str(keys[1].path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_restore_without_or_with_a_wrong_identity_fails_clearly(
    tmp_path: Path, pg: PgCluster, keys: tuple[AgeKey, ...], encrypted_backup: EncryptedBackup
) -> None:
    cfg = str(encrypted_backup.config)
    target = _new_db(pg)
    env = {"PGPASSWORD": pg.password}
    out = run_cli("restore", "app", "-c", cfg, "--to", pg.dsn(target), env=env)
    assert out.returncode == 1
    assert "encrypted with age: pass --identity FILE" in out.stderr
    assert "Traceback" not in out.stderr

    out = run_cli(
        "restore", "app", "-c", cfg, "--to", pg.dsn(target), "--identity", str(keys[2].path)
    )
    assert out.returncode == 1
    assert "no identity matches any recipient of this backup" in out.stderr
    assert pg.row_counts(target) == {}
    pg.dropdb(target)

    dump = tmp_path / "out.dump"
    out = run_cli("download", "app", "-c", cfg, "-o", str(dump), "--identity", str(keys[2].path))
    assert out.returncode == 1 and "--identity" in out.stderr
    out = run_cli("download", "app", "-c", cfg, "-o", str(dump))
    assert out.returncode == 1 and "pass --identity FILE" in out.stderr
    assert list(tmp_path.glob("*out.dump*")) == []


def test_a_damaged_encrypted_object_is_refused_and_nothing_is_written(
    tmp_path: Path, keys: tuple[AgeKey, ...], encrypted_backup: EncryptedBackup
) -> None:
    obj = encrypted_backup.object_file
    data = bytearray(obj.read_bytes())
    data[-20] ^= 0x01
    obj.write_bytes(bytes(data))
    dump = tmp_path / "out.dump"
    out = run_cli(
        "download",
        "app",
        "-c",
        str(encrypted_backup.config),
        "-o",
        str(dump),
        "--identity",
        str(keys[0].path),
    )
    assert out.returncode == 1
    assert "corrupted" in out.stderr
    assert list(tmp_path.glob("*out.dump*")) == []


def test_manifest_records_the_recipients_and_no_key_material(
    keys: tuple[AgeKey, ...], encrypted_backup: EncryptedBackup
) -> None:
    assert encrypted_backup.manifest["encryption"] == {
        "type": "age",
        "recipients": [keys[0].recipient, keys[1].recipient],
    }
    stored = encrypted_backup.manifest_file.read_text()
    assert json.loads(stored)["encryption"] == encrypted_backup.manifest["encryption"]
    assert "secret-key" not in stored.lower()
    for key in keys:
        secret = key.path.read_text().splitlines()[-1]
        assert secret.lower()[20:] not in stored.lower()
