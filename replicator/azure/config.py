"""Where the replica blobs live and how to authenticate: `azure://ACCOUNT/CONTAINER[/PREFIX][?SAS&options]`,
a connection string, an account URL with a SAS token, or the environment (AZURE_STORAGE_CONNECTION_STRING,
AZURE_STORAGE_SAS_TOKEN, AZURE_STORAGE_KEY) -- the same sources the Azure tools use, so an operator's
existing setup works unchanged. Account `devstoreaccount1` without an endpoint means a local Azurite.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from ..errors import UsageError
from .azurite import DEV_ACCOUNT, DEV_KEY

ENV_CONNECTION_STRING = "AZURE_STORAGE_CONNECTION_STRING"
ENV_SAS = "AZURE_STORAGE_SAS_TOKEN"
ENV_KEY = "AZURE_STORAGE_KEY"
# our query keys; the rest is the SAS
OPTIONS = ("endpoint", "retention", "concurrency", "writer", "max_age", "key_file", "checkpoint_mib")
_CONTAINER = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")


@dataclass
class AzureConfig:
    """Everything needed to open the container client; `options` carries target settings from the URL."""
    container: str
    account: str = ""
    account_url: str = ""
    sas: str = ""
    key: str = ""
    connection_string: str = ""
    prefix: str = ""
    options: dict = field(default_factory=dict)

    def describe(self) -> str:
        """The location without secrets, for messages."""
        where = self.account_url or self.account or "connection string"
        return f"{where}/{self.container}" + (f"/{self.prefix}" if self.prefix else "")

    def container_client(self, **client_kw):
        """An asyncio ContainerClient (aiohttp transport). client_kw go to the SDK (policies, timeouts)."""
        from azure.storage.blob.aio import ContainerClient
        client_kw.setdefault("connection_timeout", 20)
        client_kw.setdefault("read_timeout", 120)
        if self.connection_string:
            return ContainerClient.from_connection_string(self.connection_string, self.container, **client_kw)
        credential = self.sas or ({"account_name": self.account, "account_key": self.key} if self.key else None)
        return ContainerClient(self.account_url, self.container, credential=credential, **client_kw)


def parse_azure_url(url: str, *, env: dict | None = None) -> AzureConfig:
    """`azure://ACCOUNT/CONTAINER[/PREFIX][?SAS][&endpoint=URL&retention=N&concurrency=N&writer=ID&key_file=PATH]`
    (key_file: encrypt stored data with the customer's key, see crypto.py; checkpoint_mib: record an
    upload's progress every N MiB, so a killed primary resends at most that much).
    Credentials: a SAS in the URL, else the environment; ACCOUNT `-` takes everything from the
    connection string in AZURE_STORAGE_CONNECTION_STRING."""
    env = os.environ if env is None else env
    parts = urlsplit(url)
    if parts.scheme != "azure" or not parts.netloc:
        raise UsageError(f"{_redact(url)}: not an azure://ACCOUNT/CONTAINER URL")
    account = unquote(parts.netloc)
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise UsageError(f"{_redact(url)}: the URL names no container (azure://ACCOUNT/CONTAINER)")
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = {k: v for k, v in query if k in OPTIONS}
    sas = urlencode([(k, v) for k, v in query if k not in OPTIONS])
    cfg = AzureConfig(container=path[0], prefix="/".join(path[1:]), sas=sas,
                      options=_typed_options(options, url))
    _check_container(cfg.container)
    if account == "-":
        return _from_env_connection_string(cfg, env, url)
    if not _ACCOUNT.match(account):
        raise UsageError(f"{_redact(url)}: {account!r} is not a storage account name (3-24 lowercase letters/digits)")
    cfg.account = account
    cfg.account_url = options.get("endpoint") or _default_endpoint(account)
    if not cfg.sas:
        _credentials_from_env(cfg, env)
    return cfg


def from_connection_string(connection_string: str, container: str, prefix: str = "") -> AzureConfig:
    _check_container(container)
    fields = _conn_fields(connection_string)
    return AzureConfig(container=container, account=fields.get("accountname", ""), prefix=prefix,
                       connection_string=connection_string)


def from_account_url(account_url: str, container: str, *, sas: str = "", key: str = "",
                     prefix: str = "") -> AzureConfig:
    """An account URL (https://ACCOUNT.blob.core.windows.net, or Azurite's http://host:port/ACCOUNT),
    with a SAS token (a '?' prefix is fine) or an account key."""
    _check_container(container)
    parts = urlsplit(account_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{account_url}: not an http(s) account URL")
    sas = sas.lstrip("?") or parts.query
    base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    account = parts.netloc.split(".")[0] if "." in parts.netloc else parts.path.strip("/").split("/")[0]
    return AzureConfig(container=container, account=account, account_url=base, sas=sas, key=key, prefix=prefix)


def from_env(container: str, prefix: str = "", env: dict | None = None) -> AzureConfig:
    env = os.environ if env is None else env
    if not env.get(ENV_CONNECTION_STRING):
        raise UsageError(f"{ENV_CONNECTION_STRING} is not set")
    return from_connection_string(env[ENV_CONNECTION_STRING], container, prefix)


def _from_env_connection_string(cfg: AzureConfig, env, url: str) -> AzureConfig:
    cs = env.get(ENV_CONNECTION_STRING)
    if not cs:
        raise UsageError(f"{_redact(url)}: account '-' needs {ENV_CONNECTION_STRING} in the environment")
    cfg.connection_string = cs
    cfg.account = _conn_fields(cs).get("accountname", "")
    return cfg


def _credentials_from_env(cfg: AzureConfig, env) -> None:
    """Fill in credentials for cfg.account from the environment (a connection string for the same account
    wins, then a SAS token, then an account key); the dev account falls back to its well-known key."""
    cs = env.get(ENV_CONNECTION_STRING, "")
    fields = _conn_fields(cs) if cs else {}
    if cs and fields.get("accountname", "").lower() == cfg.account and "endpoint" not in cfg.options:
        cfg.connection_string = cs
    elif env.get(ENV_SAS):
        cfg.sas = env[ENV_SAS].lstrip("?")
    elif env.get(ENV_KEY):
        cfg.key = env[ENV_KEY]
    elif cfg.account == DEV_ACCOUNT:
        cfg.key = DEV_KEY


def _default_endpoint(account: str) -> str:
    if account == DEV_ACCOUNT:
        return f"http://127.0.0.1:10000/{DEV_ACCOUNT}"
    return f"https://{account}.blob.core.windows.net"


def _typed_options(options: dict, url: str) -> dict:
    out: dict = {}
    for k, v in options.items():
        if k in ("retention", "concurrency", "max_age", "checkpoint_mib"):
            try:
                out[k] = int(v)
            except ValueError:
                raise UsageError(f"{_redact(url)}: {k}={v!r} is not a whole number") from None
            if out[k] < (0 if k == "retention" else 1):
                raise UsageError(f"{_redact(url)}: {k}={v!r} is out of range")
        else:
            out[k] = v
    return out


def _conn_fields(cs: str) -> dict:
    fields = {}
    for item in cs.strip().rstrip(";").split(";"):
        if "=" not in item:
            raise UsageError("the Azure connection string is malformed (expected key=value;key=value)")
        k, v = item.split("=", 1)
        fields[k.strip().lower()] = v.strip()
    return fields


def _check_container(name: str) -> None:
    if not _CONTAINER.match(name or ""):
        raise UsageError(f"{name!r} is not a valid container name (3-63 lowercase letters, digits and single "
                         "hyphens)")


def _redact(url: str) -> str:
    """The URL with any SAS signature hidden, fit for an error message."""
    return re.sub(r"(sig=)[^&]*", r"\1***", url)
