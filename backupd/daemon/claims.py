"""The claim protocol of several daemons sharing one schedule (pure: no I/O, no clocks).

A *claim* is a small object in the HA storage, one per `(job, slot)` (and one
per background duty: retention of a job, the sweeper). Its holder wrote it
with a conditional create and rewrites it, conditional on the ETag it holds,
every `lease / 3`. Anyone else only reads it:

- state `done` (the slot ran, whatever its result) or the object gone: settled;
- state `released` (its holder stopped without finishing): take it over now;
- state `running`, written `lease + LEASE_SLACK` ago or more by the store's
  clock (its reply's Date minus the object's Last-Modified, never two hosts'
  clocks): take it over, with a conditional replace on the ETag read.

The holder side is `Holder`: fed the *send* time of each confirmed write (on
its own monotonic clock), it says when to renew and when the claim must be
considered lost. The store stamps a write no earlier than it was sent, so a
holder that stops at `sent + lease * STOP_FRACTION` has stopped before anyone
can see the claim `lease` old. A refused renewal means someone took over:
the holder stops at once.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

LEASE_SLACK = 1.0
"""Seconds added to the lease before a claim counts as abandoned: HTTP dates have whole seconds."""

STOP_FRACTION = 0.8
"""A holder that could not confirm a renewal stops this fraction of the lease after the last
confirmed one was sent: the rest of the lease is the margin for its stop and for clock rates."""

RENEW_FRACTION = 1 / 3

ClaimState = Literal["running", "done", "released"]
_STATES = ("running", "done", "released")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")
MAX_CLAIM_BYTES = 4096


class InvalidClaim(ValueError):
    """A claim object that is not one backupd wrote (untrusted input)."""


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    """What a claim object holds. `token` differs in every write, so every write
    gets a new ETag (S3's ETag of a small object is its MD5)."""

    job: str
    slot: str
    node: str
    run_id: str
    state: ClaimState
    token: str
    version: int = 1

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def with_(self, **changes: Any) -> ClaimRecord:
        return replace(self, **changes)

    @classmethod
    def from_json(cls, raw: bytes) -> ClaimRecord:
        if len(raw) > MAX_CLAIM_BYTES:
            raise InvalidClaim(f"larger than {MAX_CLAIM_BYTES} bytes")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise InvalidClaim("not JSON") from None
        if not isinstance(data, dict) or data.get("version") != 1:
            raise InvalidClaim("not a version 1 claim")
        for name in ("job", "slot", "node", "run_id", "token"):
            value = data.get(name)
            if not isinstance(value, str) or not _WORD.fullmatch(value):
                raise InvalidClaim(f"{name} is missing or not a plain name")
        state = data.get("state")
        if state not in _STATES:
            raise InvalidClaim("state is not running, done or released")
        return cls(
            job=data["job"],
            slot=data["slot"],
            node=data["node"],
            run_id=data["run_id"],
            state=state,
            token=data["token"],
        )


class Seen(enum.Enum):
    """What an observer does about a claim it read."""

    WAIT = "wait"  # a live holder: read again later
    TAKE_OVER = "take_over"  # abandoned or released: conditional replace on its ETag
    SETTLED = "settled"  # done or gone: nothing left to do for this slot


def judge(record: ClaimRecord | None, age: float, lease: float) -> Seen:
    """An observer's decision from a claim and its age by the store's clock.

    An unreadable claim (`None` with the object present is the caller's to
    avoid) is treated by the caller as gone only if the object is gone.
    """
    if record is None or record.state == "done":
        return Seen.SETTLED
    if record.state == "released":
        return Seen.TAKE_OVER
    if age >= lease + LEASE_SLACK:
        return Seen.TAKE_OVER
    return Seen.WAIT


class HolderState(enum.Enum):
    HELD = "held"
    LOST = "lost"  # a renewal was refused: someone else holds it now
    EXPIRED = "expired"  # no renewal confirmed in time: stop before anyone may take over
    FINISHED = "finished"  # written done or released by its holder


@dataclass
class Holder:
    """The holder's view of one claim, driven by its own monotonic clock."""

    lease: float
    confirmed_sent_at: float  # when the last write the store accepted was sent
    state: HolderState = HolderState.HELD

    def renew_at(self) -> float:
        return self.confirmed_sent_at + self.lease * RENEW_FRACTION

    def deadline(self) -> float:
        """Past this, the holder must have stopped: the claim may be taken over soon."""
        return self.confirmed_sent_at + self.lease * STOP_FRACTION

    def renewed(self, sent_at: float) -> None:
        if self.state is HolderState.HELD:
            self.confirmed_sent_at = max(self.confirmed_sent_at, sent_at)

    def refused(self) -> None:
        if self.state is HolderState.HELD:
            self.state = HolderState.LOST

    def tick(self, now: float) -> HolderState:
        if self.state is HolderState.HELD and now >= self.deadline():
            self.state = HolderState.EXPIRED
        return self.state

    def may_act(self, now: float) -> bool:
        """Whether the holder may still do what the claim covers (publish, delete)."""
        return self.tick(now) is HolderState.HELD

    def finished(self) -> None:
        if self.state is HolderState.HELD:
            self.state = HolderState.FINISHED


def slot_name(when_rfc3339_basic: str) -> str:
    """A slot's name in a claim key: the scheduled time, `YYYYMMDDTHHMMSSZ`."""
    if not re.fullmatch(r"\d{8}T\d{6}Z", when_rfc3339_basic):
        raise ValueError(f"not a slot time: {when_rfc3339_basic!r}")
    return when_rfc3339_basic
