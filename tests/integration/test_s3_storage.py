"""S3Storage against a real SeaweedFS server, and parity with FileStorage."""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorajobs.jobspecs.failures import ObjectNotFound, StorageAuthError, StorageError
from lorajobs.storage.backends import open_storage
from lorajobs.storage.base import Storage
from lorajobs.storage.files import FileStorage
from lorajobs.storage.s3 import S3Storage


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.slow)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """The same tests over a folder bucket and over a real S3 server."""
    if request.param == "file":
        yield FileStorage(tmp_path / "bucket" / "root")
    else:
        env = request.getfixturevalue("s3_env")
        yield open_storage(f"{env.uri}/root")


def test_put_get_list_exists_delete(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(3000))
    storage.put_file(src, "a/w.bin")
    storage.put_bytes(b"cfg", "a/sub/config.json")
    storage.put_bytes(b"sibling", "ab/x")  # shares the letters, not the folder
    assert [(o.key, o.size) for o in storage.list("a")] == [
        ("a/sub/config.json", 3),
        ("a/w.bin", 3000),
    ]
    assert [o.key for o in storage.list("a/")] == ["a/sub/config.json", "a/w.bin"]
    assert [o.key for o in storage.list("a/w.bin")] == ["a/w.bin"]
    assert [o.key for o in storage.list()] == ["a/sub/config.json", "a/w.bin", "ab/x"]
    assert storage.list("missing") == []
    assert all(o.etag for o in storage.list())
    assert storage.exists("a/w.bin") and not storage.exists("a/nope") and not storage.exists("a")
    storage.get_file("a/w.bin", tmp_path / "back" / "w.bin")
    assert (tmp_path / "back" / "w.bin").read_bytes() == src.read_bytes()
    assert storage.get_bytes("a/sub/config.json") == b"cfg"
    with pytest.raises(ObjectNotFound, match="no such object"):
        storage.get_bytes("a/nope")
    with pytest.raises(ObjectNotFound, match="no such object"):
        storage.get_file("a/nope", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    assert storage.delete_prefix("a") == 2
    assert [o.key for o in storage.list()] == ["ab/x"]
    assert storage.delete_prefix("nothing-here") == 0


def test_overwrite_replaces(storage: Storage) -> None:
    storage.put_bytes(b"one", "k")
    storage.put_bytes(b"two!", "k")
    assert storage.get_bytes("k") == b"two!"
    assert [(o.key, o.size) for o in storage.list()] == [("k", 4)]


@pytest.mark.slow
def test_multipart_round_trip(s3_env, tmp_path: Path) -> None:
    mib = 1024 * 1024
    st = S3Storage(s3_env.bucket, "big", multipart_threshold=5 * mib, multipart_chunksize=5 * mib)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * mib))
    st.put_file(src, "big.bin")
    (info,) = st.list("big.bin")
    assert info.size == 11 * mib and info.etag.endswith("-3")  # three parts
    st.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


@pytest.mark.slow
def test_list_pages(s3_env) -> None:
    st = S3Storage(s3_env.bucket, "many", list_page_size=3)
    for i in range(10):
        st.put_bytes(b"x", f"k{i:02d}")
    assert [o.key for o in st.list()] == [f"k{i:02d}" for i in range(10)]
    assert st.delete_prefix("") == 10 and st.list() == []


@pytest.mark.slow
@pytest.mark.parametrize("which", ["secret", "key_id"])
def test_wrong_credentials_one_clear_line(
    s3_env, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    open_storage(s3_env.uri).put_bytes(b"x", "data/x")
    bad_secret = "definitely-wrong-secret-value"
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDUNKNOWN")
    st = open_storage(f"{s3_env.uri}/data")
    for op in (
        lambda: st.list(),
        lambda: st.get_bytes("x"),
        lambda: st.exists("x"),
        lambda: st.put_bytes(b"y", "y"),
    ):
        with pytest.raises(StorageAuthError) as info:
            op()
        msg = str(info.value)
        assert msg.startswith(f"{s3_env.uri}/data")
        assert "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in msg
        assert "\n" not in msg
        rendered = "".join(traceback.format_exception(info.value))
        for secret in (bad_secret, s3_env.server.secret_key):
            assert secret not in rendered
        assert info.value.__cause__ is None and info.value.__suppress_context__  # no boto chain
    if which == "key_id":
        assert "(InvalidAccessKeyId)" in str(info.value)


@pytest.mark.slow
def test_missing_bucket(s3_env, tmp_path: Path) -> None:
    st = open_storage("s3://no-such-bucket-here/x")
    with pytest.raises(ObjectNotFound, match=r"^s3://no-such-bucket-here: no such bucket$"):
        st.list()
    with pytest.raises(ObjectNotFound, match="no such bucket"):
        st.get_bytes("k")
    with pytest.raises(ObjectNotFound, match="no such bucket"):
        st.get_file("k", tmp_path / "k")


@pytest.mark.slow
def test_server_down_names_endpoint_then_recovers(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    st = open_storage(s3_env.uri)
    st.put_bytes(b"kept", "k")
    s3_env.server.stop()
    try:
        with pytest.raises(StorageError, match="cannot reach the S3 endpoint") as info:
            st.get_bytes("k")
        assert s3_env.server.endpoint in str(info.value)
        assert not isinstance(info.value, (StorageAuthError, ObjectNotFound))
    finally:
        s3_env.server.start()
    assert st.get_bytes("k") == b"kept"  # data survives a restart; the client reconnects


@pytest.mark.slow
@pytest.mark.parametrize("fast", ["1", "0"])
def test_reads_return_stored_bytes_with_or_without_the_fast_path(
    s3_env, monkeypatch: pytest.MonkeyPatch, fast: str
) -> None:
    import gzip

    monkeypatch.setenv("LORAJOBS_S3_FAST_GET", fast)
    raw = gzip.compress(os.urandom(5000))
    # Stored with a Content-Encoding: the bytes must come back as stored, not decoded.
    s3_env.server.client().put_object(
        Bucket=s3_env.bucket, Key="p/x.gz", Body=raw, ContentEncoding="gzip"
    )
    st = open_storage(f"{s3_env.uri}/p")
    calls: list[str] = []
    real = st.client.get_object

    def botocore_get(**kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs["Key"])
        return real(**kwargs)

    st.client.get_object = botocore_get
    assert st.get_bytes("x.gz") == raw
    assert st.get_range("x.gz", 10, 100) == raw[10:110]
    assert st.get_range("x.gz", len(raw) - 5, 100) == raw[-5:]  # clipped at the end
    # The fast path serves clean reads itself; botocore serves them when it is off.
    assert calls == ([] if fast == "1" else ["p/x.gz"] * 3)
    with pytest.raises(ObjectNotFound, match="no such object"):
        st.get_bytes("missing")  # errors: botocore's answer, whichever path
    assert calls[-1] == "p/missing"
