"""What an S3 request's failure means, in backupd's errors (as rohmu's `errors.py`).

`translate` turns a botocore/aiohttp error into `TransientStorageError` (worth
retrying: throttling, 5xx, a dropped connection, a timeout), `NotFound`, or
`StorageError` with a message that names the store, the action and the cause
(credentials, access, an untrusted certificate), never a secret.
"""

from __future__ import annotations

import ssl

import aiohttp
import botocore.exceptions as botocore_errors

from backupd.errors import NotFound, StorageError, TransientStorageError

# What the request says about whether trying again can help.
TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "RequestTimeoutException",
        "OperationAborted",
        "BadDigest",
        "IncompleteBody",
        "XAmzContentSHA256Mismatch",
    }
)
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
    }
)
DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"})
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
# A conditional write refused (412), or lost to a concurrent one (409, AWS): HA claims.
PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412"})
# What a request can raise besides backupd's own errors: everything `translate` takes.
REQUEST_ERRORS = (
    botocore_errors.BotoCoreError,
    botocore_errors.ClientError,
    aiohttp.ClientError,
    OSError,
)


def error_code(exc: botocore_errors.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def translate(
    exc: BaseException, where: str, bucket: str, *, bucket_request: bool = False
) -> StorageError:
    """backupd's error for a failed request; `where` names the store and the action.

    `bucket_request`: the request was about the bucket itself, so "not found"
    means the bucket is missing, not an object.
    """
    if isinstance(exc, botocore_errors.ClientError):
        code = error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = str(exc.response.get("Error", {}).get("Message", ""))
        if code == "NoSuchBucket" or (bucket_request and code in NOT_FOUND_CODES):
            return StorageError(f"{where}: bucket {bucket!r} does not exist")
        if code in NOT_FOUND_CODES:
            return NotFound(f"{where}: not found")
        if code in CREDENTIAL_CODES:
            return StorageError(
                f"{where}: the store rejected the credentials ({code}); "
                "check access_key_id and secret_access_key"
            )
        if code in DENIED_CODES:
            return StorageError(f"{where}: access denied to bucket {bucket!r} ({code})")
        detail = f"{code or 'error'} (HTTP {status})" + (f": {message}" if message else "")
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientStorageError(f"{where}: {detail}")
        return StorageError(f"{where}: {detail}")
    if (cert_error := _certificate_error(exc)) is not None:
        return StorageError(
            f"{where}: the endpoint's TLS certificate is not trusted ({cert_error}); "
            "set ca_bundle to the CA that signed it"
        )
    if isinstance(
        exc, botocore_errors.NoCredentialsError | botocore_errors.PartialCredentialsError
    ):
        return StorageError(
            f"{where}: no credentials: set access_key_id and secret_access_key, "
            "or provide AWS credentials to the service"
        )
    if isinstance(
        exc,
        botocore_errors.HTTPClientError
        | botocore_errors.ConnectionError
        | aiohttp.ClientError
        | ConnectionError
        | TimeoutError,
    ):
        return TransientStorageError(f"{where}: {exc}")
    return StorageError(f"{where}: {exc}")


def _certificate_error(exc: BaseException) -> BaseException | None:
    """The certificate verification failure behind a request error, if that is what it is.

    An untrusted or mismatched certificate does not fix itself: retrying it for
    minutes only hides the cause. Other TLS errors (a reset handshake) stay transient.
    """
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 16:
        current = todo.pop()
        if current is None or any(current is done for done in seen):
            continue
        seen.append(current)
        if isinstance(
            current, ssl.SSLCertVerificationError | aiohttp.ClientConnectorCertificateError
        ):
            return current
        kwargs = getattr(current, "kwargs", None)  # botocore keeps the cause as kwargs["error"]
        if isinstance(kwargs, dict) and isinstance(kwargs.get("error"), BaseException):
            todo.append(kwargs["error"])
        todo.extend((current.__cause__, current.__context__))
    return None
