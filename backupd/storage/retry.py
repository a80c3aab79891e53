"""How each storage request is retried (stamina), shared by the backends that retry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import stamina

from backupd.errors import TransientStorageError


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """How one S3 request (a part, a listing...) is retried on transient errors.

    `timeout` bounds all attempts of one request together. Tests pass waits of 0.
    """

    attempts: int = 6
    timeout: float = 900.0
    wait_initial: float = 0.5
    wait_max: float = 30.0
    wait_jitter: float = 1.0

    def context(self) -> Any:
        return stamina.retry_context(
            on=TransientStorageError,
            attempts=self.attempts,
            timeout=self.timeout,
            wait_initial=self.wait_initial,
            wait_max=self.wait_max,
            wait_jitter=self.wait_jitter,
        )
