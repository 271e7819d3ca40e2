"""Handing a bucket's bytes to a client directly: presigned S3 URLs, so a server in front of the
bucket moves no bytes and holds every credential. A `file://` bucket has no URLs to give: there
the server streams (and `presignable` says so).

Uploads above `PART_SIZE` are multipart: the server starts the upload, hands out one URL per
part, and completes it with the ETags the client got back.
"""

from __future__ import annotations

import math
import os
from typing import Any

from lorajobs.storage.base import Storage
from lorajobs.storage.s3 import S3Storage

EXPIRES_S = 3600
#: Parts of a multipart upload; S3 wants at least 5 MiB (`LORAJOBS_UPLOAD_PART_MB`).
PART_SIZE = int(float(os.environ.get("LORAJOBS_UPLOAD_PART_MB") or 64) * 1024 * 1024)


def presignable(storage: Storage) -> bool:
    return isinstance(storage, S3Storage)


def download_url(storage: S3Storage, key: str, expires_s: int = EXPIRES_S) -> str:
    """A URL that GETs one object, for `expires_s` seconds."""
    return str(
        storage.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": storage.bucket, "Key": storage.object_key(key)},
            ExpiresIn=expires_s,
        )
    )


def upload_plan(storage: S3Storage, key: str, size: int) -> dict[str, Any]:
    """How a client uploads one object of `size` bytes: one presigned PUT, or (above
    PART_SIZE) a multipart upload with one presigned URL per part."""
    full = storage.object_key(key)
    if size <= PART_SIZE:
        url = storage.client.generate_presigned_url(
            "put_object", Params={"Bucket": storage.bucket, "Key": full}, ExpiresIn=EXPIRES_S
        )
        return {"method": "PUT", "url": str(url)}
    upload_id = storage.client.create_multipart_upload(Bucket=storage.bucket, Key=full)["UploadId"]
    parts = [
        {
            "number": n,
            "url": str(
                storage.client.generate_presigned_url(
                    "upload_part",
                    Params={
                        "Bucket": storage.bucket,
                        "Key": full,
                        "UploadId": upload_id,
                        "PartNumber": n,
                    },
                    ExpiresIn=EXPIRES_S,
                )
            ),
        }
        for n in range(1, math.ceil(size / PART_SIZE) + 1)
    ]
    return {"method": "multipart", "upload_id": upload_id, "part_size": PART_SIZE, "parts": parts}


def complete_upload(storage: S3Storage, key: str, upload_id: str, etags: list[str]) -> None:
    """Finish a multipart upload from the parts' ETags, in order."""
    storage.client.complete_multipart_upload(
        Bucket=storage.bucket,
        Key=storage.object_key(key),
        UploadId=upload_id,
        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]},
    )
