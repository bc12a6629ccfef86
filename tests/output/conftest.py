"""Fixtures of the output tests."""
from __future__ import annotations

import pytest


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """The session's moto server (tests/conftest.py `s3_server`) with its AWS_* variables set in this process, and
    s3fs's cached clients dropped before and after, so in-process code talks to it as a user's run would."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()      # a client made with this server's endpoint
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()
