"""The clients a `RemoteReader`'s requests go through: obstore for `s3://` (the fast path), fsspec for every URL
(the fallback, and the only client of the other protocols).

Both answer the same two questions about an object of the checkpoint, named by its path relative to the
checkpoint's URL: its size (`head`), and the bytes of a range (`get`). `open_client` picks one from the run's
`FastPaths` (`obstore` is on when the package is importable and STREAMCONV_NO_FAST_PATHS does not
turn it off) and from what obstore can honour:

* the URL is `s3://` (gs:// works in obstore too, but no local GCS server tests it here: it stays on fsspec);
* every `--storage-options` key has an obstore equivalent (`key`, `secret`, `token`, `anon`, `endpoint_url`,
  `client_kwargs.endpoint_url|region_name`); anything else (`config_kwargs`, `profile`, `requester_pays`...) is
  fsspec's own meaning, so fsspec reads;
* credentials come the standard way as botocore resolves them: `AWS_*` variables (obstore reads them itself),
  otherwise botocore's chain (profiles, SSO, instance metadata) handed to obstore as a refreshing provider; a
  profile that sets its own `endpoint_url` (which obstore would not see) keeps the fsspec reader.

The obstore client sends every GET with `If-Match: <the ETag its HEAD saw>`, so an object re-uploaded during the
run fails the very next read (412) instead of being caught only before the commit. Neither client ever puts the
storage options into a message.
"""
from __future__ import annotations

import importlib.util
import os
from datetime import timedelta
from typing import Any, Dict, Optional, Protocol

from ..errors import CheckpointError
from ..fs import remote
from ..fs.fastpaths import NONE, FastPaths

FSSPEC, OBSTORE = "fsspec", "obstore"
# obstore's own retries under ours (fs.remote.with_retries, RETRY_ATTEMPTS rounds): 4 tries a round at
# 0.1 s, 0.2 s, 0.4 s, as s3fs retries under botocore's AWS_MAX_ATTEMPTS.
OBSTORE_RETRIES = 3
OBSTORE_RETRY_TIMEOUT_S = 30
_OPTION_KEYS = {"key": "access_key_id", "secret": "secret_access_key", "token": "token",
                "endpoint_url": "endpoint"}
_CLIENT_KWARGS = {"endpoint_url": "endpoint", "region_name": "region"}


class ObjectClient(Protocol):
    name: str       # FSSPEC or OBSTORE (reports, pickling)

    def head(self, path: str) -> int:
        """The size of the object at `path` (FileNotFoundError when absent; CheckpointError for a folder)."""

    def get(self, path: str, start: int, end: int) -> Any:
        """The bytes [start, end) of the object (bytes or a buffer; fewer only if the object is shorter)."""


def open_client(url: str, fast: FastPaths = NONE) -> ObjectClient:
    """The client of the checkpoint at `url`: obstore when `uses_obstore(url, fast)`, else fsspec."""
    settings = _obstore_settings(url) if fast.obstore else None
    if settings is not None:
        return ObstoreClient(url, *settings)
    return FsspecClient(url)


def uses_obstore(url: str, fast: FastPaths) -> bool:
    """`fast.obstore` and obstore can honour the URL, the storage options and the credentials (module
    docstring): what `open_client` decides, asked once by a run for its report."""
    return bool(fast.obstore) and _obstore_settings(url) is not None


def obstore_available() -> bool:
    return importlib.util.find_spec("obstore") is not None


def obstore_config(options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """obstore's S3 config for fsspec-style `options`, or None when one of them means nothing to obstore."""
    config: Dict[str, Any] = {}
    for key, value in options.items():
        if key in _OPTION_KEYS:
            config[_OPTION_KEYS[key]] = str(value)
        elif key == "anon":
            config["skip_signature"] = bool(value)
        elif key == "client_kwargs" and isinstance(value, dict) and set(value) <= set(_CLIENT_KWARGS):
            config.update({_CLIENT_KWARGS[k]: str(v) for k, v in value.items()})
        else:
            return None
    return config


class FsspecClient:
    """Any fsspec URL (s3fs, gcsfs, memory://...)."""

    name = FSSPEC

    def __init__(self, url: str):
        self.fs, self.prefix = remote.filesystem(url)
        self.url = url

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}"

    def head(self, path: str) -> int:
        info = self.fs.info(self._key(path))
        if info.get("type") == "directory":
            raise CheckpointError(f"{self.url}/{path} is a folder, not a file; the checkpoint's data files are "
                                  "objects")
        return int(info.get("size") or 0)

    def get(self, path: str, start: int, end: int) -> Any:
        return self.fs.cat_file(self._key(path), start=start, end=end)


class ObstoreClient:
    """s3:// through obstore (object_store, Rust): requests run outside the GIL on its own connection pool."""

    name = OBSTORE

    def __init__(self, url: str, config: Dict[str, Any], credential_provider=None):
        from obstore.store import S3Store
        self.url = url
        endpoint = config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or \
            os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
        client_options = {"allow_http": endpoint.startswith("http://"), "connect_timeout": "10s",
                          "timeout": "120s"}
        retry = {"max_retries": OBSTORE_RETRIES, "retry_timeout": timedelta(seconds=OBSTORE_RETRY_TIMEOUT_S),
                 "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                             "base": 2}}
        self.store = S3Store.from_url(url, config=config, client_options=client_options, retry_config=retry,
                                      credential_provider=credential_provider)
        self._etags: Dict[str, str] = {}

    def head(self, path: str) -> int:
        import obstore
        meta = obstore.head(self.store, path)      # NotFoundError is a FileNotFoundError
        if meta.get("e_tag"):
            self._etags[path] = meta["e_tag"]
        return int(meta["size"])

    def get(self, path: str, start: int, end: int) -> Any:
        import obstore
        from obstore.exceptions import PreconditionError
        options: Dict[str, Any] = {"range": (start, end)}
        etag = self._etags.get(path)
        if etag:
            options["if_match"] = etag
        try:
            return obstore.get(self.store, path, options=options).bytes()
        except PreconditionError:
            raise CheckpointError(f"{self.url}/{path}: the checkpoint changed while it was converted (the "
                                  f"object's ETag is no longer {etag}); run again once it is complete") from None


def _obstore_settings(url: str):
    """(obstore's config, a credential provider or None) for `url`, with botocore's credentials and region when
    neither the options nor the AWS_* variables give them; None when obstore cannot read this URL as fsspec
    would (another protocol, an option it has no equivalent for, a profile with its own endpoint) or is absent."""
    if remote.scheme(url) != "s3" or not obstore_available():
        return None
    config = obstore_config(remote.StorageOptions.get())
    if config is None:
        return None
    provider = None
    env_keys = "AWS_ACCESS_KEY_ID" in os.environ and "AWS_SECRET_ACCESS_KEY" in os.environ
    needs_region = "region" not in config and not (os.environ.get("AWS_REGION")
                                                   or os.environ.get("AWS_DEFAULT_REGION"))
    if not config.get("skip_signature") and ("access_key_id" not in config and not env_keys or needs_region):
        resolved = _botocore_chain(need_credentials="access_key_id" not in config and not env_keys)
        if resolved is None:
            return None
        provider, region = resolved
        if needs_region:
            config = dict(config, region=region or "us-east-1")
    return config, provider


def _botocore_chain(need_credentials: bool):
    """(a credential provider or None, the region) as botocore resolves them for the current profile; None when
    botocore is absent, the profile does not exist or sets an endpoint of its own."""
    try:
        import botocore.session
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return None
    try:
        session = botocore.session.get_session()
        scoped = session.get_scoped_config()
        if "endpoint_url" in scoped or "services" in scoped:
            return None
        region = session.get_config_variable("region")
        if not need_credentials:
            return None, region
        credentials = session.get_credentials()
    except BotoCoreError:
        return None
    if credentials is None:
        return None     # no credentials anywhere: fsspec's reader reports it as it always has

    def provide() -> Dict[str, Any]:
        frozen = credentials.get_frozen_credentials()      # refreshes an expiring (SSO, assumed-role) credential
        expiry = getattr(credentials, "_expiry_time", None)
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token, "expires_at": expiry}

    return provide, region
