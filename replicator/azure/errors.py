"""What Azure Storage failures mean for replication: temporary (retry with backoff, shrink concurrency) or a
clear ReplicatorError naming the blob and what to do. Every SDK call of replicator.azure goes through
`classify`, so no raw azure.core exception reaches a caller."""
from __future__ import annotations

import asyncio

from ..errors import ReplicatorError, UsageError
from ..targets.base import TargetUnavailable

try:                                   # the SDK is a dependency, but keep the errors importable without it
    from azure.core.exceptions import (ClientAuthenticationError, HttpResponseError, ResourceNotFoundError,
                                       ServiceRequestError, ServiceResponseError)
except ImportError:                    # pragma: no cover
    ClientAuthenticationError = HttpResponseError = ResourceNotFoundError = ()  # type: ignore[assignment]
    ServiceRequestError = ServiceResponseError = ()  # type: ignore[assignment]


class AzureError(ReplicatorError):
    """Azure Storage refused an operation for a reason retrying will not fix."""

    exit_code = 14


class AzureAuthError(AzureError):
    """The account rejected the credentials (wrong key, expired or too narrow SAS)."""


class AzureNotFound(AzureError):
    """The container (or a blob or snapshot we were told about) does not exist."""


class ContainerMissing(AzureNotFound):
    """The container does not exist (replication creates it for a new replica; reading from it cannot)."""


class WriterConflict(AzureError):
    """Another writer holds the blob: its lease, etag or sequence number is not ours. Nothing was written."""


class BlobTooLarge(UsageError):
    """The disk does not fit in a page blob (8 TiB including the VHD footer)."""


class VerifyError(AzureError):
    """A copied blob's digest differs from its source's."""


TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
LEASE_CODES = frozenset({
    "LeaseIdMissing", "LeaseIdMismatchWithBlobOperation", "LeaseAlreadyPresent",
    "LeaseNotPresentWithBlobOperation", "LeaseLost", "LeaseIdMismatchWithLeaseOperation",
    "LeaseNotPresentWithLeaseOperation", "LeaseIsBrokenAndCannotBeRenewed", "LeaseIsBreakingAndCannotBeAcquired",
    "ConditionNotMet", "SequenceNumberConditionNotMet", "TargetConditionNotMet", "BlobAlreadyExists"})
AUTH_CODES = frozenset({"AuthenticationFailed", "AuthorizationFailure", "AuthorizationPermissionMismatch",
                        "AuthorizationResourceTypeMismatch", "AuthorizationServiceMismatch",
                        "AuthorizationSourceIPMismatch", "AuthorizationProtocolMismatch", "InvalidAuthenticationInfo"})


def error_code(e: BaseException) -> str:
    """The storage error code as a plain string ('' when the response had none)."""
    code = getattr(e, "error_code", None)
    return str(getattr(code, "value", code) or "")


def is_transient(e: BaseException) -> bool:
    """Worth another try after a pause: throttling, server errors, timeouts, dropped connections."""
    if isinstance(e, (asyncio.TimeoutError, ConnectionError, ServiceRequestError, ServiceResponseError)):
        return True
    status = getattr(e, "status_code", None)
    return isinstance(e, HttpResponseError) and status in TRANSIENT_STATUS


def classify(e: BaseException, what: str) -> ReplicatorError:
    """The ReplicatorError a failed call of `what` (e.g. 'Put Page on c/d.vhd') stands for."""
    if isinstance(e, ReplicatorError):
        return e
    code, status = error_code(e), getattr(e, "status_code", None)
    msg = _first_line(e)
    if is_transient(e):
        return TargetUnavailable(f"{what}: temporary failure ({status or type(e).__name__}: {msg})")
    if isinstance(e, ClientAuthenticationError) or code in AUTH_CODES or status == 403:
        return AzureAuthError(f"{what}: the storage account rejected the credentials ({code or status}): check the "
                              "account key, connection string or SAS token (permissions, expiry)")
    if code == "ContainerNotFound":
        return ContainerMissing(f"{what}: the container does not exist (check its name and account)")
    if code in LEASE_CODES:
        return WriterConflict(f"{what}: the blob is held or was changed by another writer ({code}); refusing to "
                              "write. Stop the other writer, or break its lease with `replicator azure cleanup "
                              "--break-lease` once it is certainly gone")
    if isinstance(e, ResourceNotFoundError) or status == 404:
        return AzureNotFound(f"{what}: not found ({code or status})")
    if isinstance(e, HttpResponseError):
        return AzureError(f"{what}: failed ({status} {code}): {msg}")
    if isinstance(e, (ValueError, TypeError)):
        return UsageError(f"{what}: {e}")
    return AzureError(f"{what}: {type(e).__name__}: {msg}")


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "reason", None) or e or type(e).__name__)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


__all__ = ["AzureAuthError", "AzureError", "AzureNotFound", "BlobTooLarge", "ContainerMissing", "VerifyError",
           "WriterConflict", "classify", "error_code", "is_transient"]
