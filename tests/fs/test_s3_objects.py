"""fs/s3_objects.py: the keyword arguments of a part upload, built from s3fs's public attributes and botocore's
service model, are what s3fs's own (private) merge would send. If s3fs renames or changes
`_get_s3_method_kwargs`, this test fails: look at what it does now and follow it in `request_kwargs`."""
from __future__ import annotations

import pytest

from streamconv.fs.s3_objects import request_kwargs

s3fs = pytest.importorskip("s3fs")


@pytest.mark.parametrize("requester_pays", [False, True])
def test_part_upload_kwargs_are_what_s3fs_would_send(requester_pays):
    extra = {"SSECustomerAlgorithm": "AES256", "SSECustomerKey": "k" * 32, "ACL": "private",
             "ServerSideEncryption": "aws:kms", "ExpectedBucketOwner": "123"}
    fs = s3fs.S3FileSystem(key="a", secret="b", endpoint_url="http://127.0.0.1:9", s3_additional_kwargs=extra,
                           requester_pays=requester_pays, skip_instance_cache=True)
    fs.connect()
    s3_client = fs.s3
    call = dict(Bucket="b", Key="k", UploadId="u", PartNumber=3, Body=b"x")
    ours = request_kwargs(fs, s3_client, "UploadPart", **call)
    assert ours == fs._get_s3_method_kwargs(s3_client.upload_part, **call)
    # the parameters UploadPart takes are kept (SSE-C keys, the owner check, requester pays), the others dropped
    assert {"SSECustomerKey", "ExpectedBucketOwner"} <= set(ours) and "ACL" not in ours
    assert ("RequestPayer" in ours) is requester_pays and ours["PartNumber"] == 3
