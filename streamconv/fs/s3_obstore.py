"""s3:// through obstore (Rust's object_store): whether obstore can read a URL exactly as s3fs would, and the
store it reads through (the source folder on it is `location.ObstoreFolder`; the checkpoint's GETs are
`source.object_clients.ObstoreClient`).

obstore reads an `s3://` URL when it is installed, STREAMCONV_NO_FAST_PATHS does not name it, and it can honour
what s3fs would (`settings`):

* every `--storage-options` key has an obstore equivalent (`key`, `secret`, `token`, `anon`, `endpoint_url`,
  `client_kwargs.endpoint_url|region_name`); anything else (`config_kwargs`, `profile`, `requester_pays`...) is
  fsspec's own meaning, so fsspec reads;
* credentials come the standard way as botocore resolves them: `AWS_*` variables (obstore reads them itself),
  otherwise botocore's chain (profiles, SSO, instance metadata) handed to obstore as a refreshing provider; a
  profile that sets its own `endpoint_url` (which obstore would not see) keeps fsspec.

A run through obstore then imports neither fsspec nor s3fs (their import and first call cost 2.8 s and 30 MiB of
resident memory on the benchmark's machine).
"""
from __future__ import annotations

import importlib.util
import json
import os
import threading
from datetime import timedelta
from typing import Any, Dict, Optional, Tuple

from . import remote

# obstore's own retries under ours (remote.with_retries, RETRY_ATTEMPTS rounds): 4 tries a round at 0.1 s, 0.2 s,
# 0.4 s, as s3fs retries under botocore's AWS_MAX_ATTEMPTS.
OBSTORE_RETRIES = 3
OBSTORE_RETRY_TIMEOUT_S = 30
_OPTION_KEYS = {"key": "access_key_id", "secret": "secret_access_key", "token": "token",
                "endpoint_url": "endpoint"}
_CLIENT_KWARGS = {"endpoint_url": "endpoint", "region_name": "region"}
_ENV_NAMES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
              "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
# One store per bucket and settings, kept for the process (as fsspec keeps one filesystem per options): listing,
# HEADs and GETs share its connection pool instead of opening new connections for every `location.at`.
_MAX_STORES = 8
_stores: Dict[Tuple, Any] = {}
_stores_lock = threading.Lock()


def available() -> bool:
    return importlib.util.find_spec("obstore") is not None


def config_for(options: Dict[str, Any]) -> Optional[Dict[str, Any]]:
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


def settings(url: str):
    """(obstore's config, a credential provider or None) for `url`, with botocore's credentials and region when
    neither the options nor the AWS_* variables give them; None when obstore cannot read this URL as fsspec
    would (another protocol, an option it has no equivalent for, a profile with its own endpoint) or is absent."""
    if remote.scheme(url) != "s3" or not available():
        return None
    config = config_for(remote.StorageOptions.get())
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


def bucket_and_key(url: str) -> Tuple[str, str]:
    """("bucket", "key/inside") of `s3://bucket/key/inside/` (the key without a trailing slash, "" at the root)."""
    rest = url.partition("://")[2]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def store_for(url: str):
    """The obstore S3Store of `url`'s bucket (the whole bucket: keys are full), or None when obstore cannot read
    `url` as fsspec would (`settings`)."""
    if remote.scheme(url) != "s3" or not available():
        return None
    environment = tuple(os.environ.get(name) for name in _ENV_NAMES)
    key = (bucket_and_key(url)[0], json.dumps(remote.StorageOptions.get(), sort_keys=True, default=str),
           environment, OBSTORE_RETRIES)
    with _stores_lock:
        if key in _stores:
            return _stores[key]
    chosen = settings(url)
    store = _open_store(key[0], *chosen) if chosen is not None else None
    with _stores_lock:
        if len(_stores) >= _MAX_STORES:
            _stores.clear()
        _stores[key] = store
    return store


def clear_stores() -> None:
    """Forget the stores (and the choice between obstore and fsspec) made so far: a changed AWS profile file is
    seen by the next `store_for` (fsspec's `clear_instance_cache` does the same for its filesystems)."""
    with _stores_lock:
        _stores.clear()


def _open_store(bucket: str, config: Dict[str, Any], credential_provider=None):
    from obstore.store import S3Store
    endpoint = config.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3") or \
        os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT") or ""
    client_options = {"allow_http": endpoint.startswith("http://"), "connect_timeout": "10s", "timeout": "120s"}
    retry = {"max_retries": OBSTORE_RETRIES, "retry_timeout": timedelta(seconds=OBSTORE_RETRY_TIMEOUT_S),
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                         "base": 2}}
    return S3Store(bucket, config=config, client_options=client_options, retry_config=retry,
                   credential_provider=credential_provider)
