"""Azure page blobs as a replica target (fixed-VHD layout, snapshots as recovery points), and Azure as a
recovery site: machine points and their retention (points.py), encryption with the customer's key
(crypto.py, keys.py), checksum resync through a digest sidecar (digests.py), failover of a disk
(failover.py) or of a machine to a deployable VM (deploy.py), export (export.py), failback (failback.py);
Azurite as the local stand-in for tests and demos. Needs azure-storage-blob (asyncio client, aiohttp
transport) and cryptography."""
from .config import AzureConfig, from_account_url, from_connection_string, from_env, parse_azure_url
from .errors import (AzureAuthError, AzureError, AzureNotFound, BlobTooLarge, ContainerMissing, VerifyError,
                     WriterConflict)
from .meta import PAGE_BLOB_MAX, Point
from .target import AzureTarget, SendStats


def open_target(url: str, **kw) -> AzureTarget:
    """The target for `--to azure://ACCOUNT/CONTAINER[/PREFIX]?...` (see parse_azure_url)."""
    return AzureTarget.from_url(url, **kw)


__all__ = ["AzureAuthError", "AzureConfig", "AzureError", "AzureNotFound", "AzureTarget", "BlobTooLarge",
           "ContainerMissing", "PAGE_BLOB_MAX", "Point", "SendStats", "VerifyError", "WriterConflict",
           "from_account_url", "from_connection_string", "from_env", "open_target", "parse_azure_url"]
