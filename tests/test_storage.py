"""Storage layer: local and S3 (a real moto server on loopback) behave the same; errors are classified once."""

from __future__ import annotations

import hashlib
import os
import socket
import stat

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from harmonize_core.errors import InputError
from tasks import storage
from tasks.storage import TransientStorageError


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def test_local_round_trip_is_atomic_and_digested(tmp_path):
    uri = str(tmp_path / "a" / "b" / "x.png")
    data = b"\x89PNG fake bytes"
    assert storage.write_bytes(uri, data) == hashlib.sha256(data).hexdigest()
    assert storage.read_bytes(uri) == data
    assert storage.digest(uri) == hashlib.sha256(data).hexdigest()
    assert storage.exists(uri) and not storage.exists(uri + ".missing")
    assert os.listdir(tmp_path / "a" / "b") == ["x.png"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(uri).st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    storage.write_bytes(uri, b"new")
    assert storage.read_bytes(uri) == b"new"
    assert storage.list_uris(str(tmp_path)) == [uri]
    storage.delete(uri)
    assert storage.list_uris(str(tmp_path)) == []


def test_local_errors_are_permanent_input_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        storage.read_bytes(str(tmp_path / "nope.png"))
    with pytest.raises(InputError, match="is a directory"):
        storage.read_bytes(str(tmp_path))
    assert storage.digest(str(tmp_path / "nope.png")) is None


def test_paths_join_and_resolve_like_the_manifest_needs():
    assert storage.join("s3://b/p/", "id", "x.png") == "s3://b/p/id/x.png"
    assert storage.join("/o", "id", "x.png") == "/o/id/x.png"
    assert storage.parent("s3://b/m/manifest.csv") == "s3://b/m"
    assert storage.parent("s3://b/manifest.csv") == "s3://b"
    assert storage.resolve("s3://b/m", "imgs/../x.jpg") == "s3://b/m/x.jpg"
    assert storage.resolve("s3://b/m", "s3://other/y.jpg") == "s3://other/y.jpg"
    assert storage.resolve("/data/m", "sub/y.jpg") == "/data/m/sub/y.jpg"
    assert storage.resolve("/data/m", "/abs/y.jpg") == "/abs/y.jpg"
    assert storage.resolve("s3://b/m", "/abs/y.jpg") == "/abs/y.jpg"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "..", "a..b", ".hidden", "-x", "x" * 129, "a b", "é"])
def test_uri_for_refuses_ids_that_could_escape_the_output(bad):
    with pytest.raises(InputError, match="unsafe item id"):
        storage.uri_for("s3://out/run", bad, "pass1", "png")


def test_uri_for_is_the_one_layout():
    assert storage.uri_for("s3://out/run", "cat-01.v2_b", "pass1", "png") == "s3://out/run/cat-01.v2_b/pass1.png"
    assert storage.uri_for("/o", "x", "dilate", "json") == "/o/x/dilate.json"
    assert storage.run_uri("/o", "r1", "summary.csv") == "/o/runs/r1/summary.csv"
    assert storage.cache_uri("s3://b/p") == "s3://b/p/.cache"


@pytest.mark.parametrize(("error", "kind"), [
    (_client_error("NoSuchKey", 404), InputError),
    (_client_error("404", 404), InputError),
    (_client_error("AccessDenied", 403), InputError),
    (_client_error("SlowDown", 503), TransientStorageError),
    (_client_error("InternalError", 500), TransientStorageError),
    (_client_error("Whatever", 502), TransientStorageError),
    (EndpointConnectionError(endpoint_url="http://x"), TransientStorageError),
])
def test_classify_separates_permanent_from_transient(error, kind):
    classified = storage.classify(error, "s3://b/k")
    assert isinstance(classified, kind)
    assert "s3://b/k" in str(classified)
    assert isinstance(classified, ConnectionError) == (kind is TransientStorageError)


def test_s3_round_trip_against_a_real_server(s3, tmp_path):
    uri = "s3://data/some/dir/x.bin"
    data = b"payload"
    digest = storage.write_bytes(uri, data)
    head = s3.head_object(Bucket="data", Key="some/dir/x.bin")
    assert head["Metadata"]["sha256"] == digest == hashlib.sha256(data).hexdigest()
    assert storage.read_bytes(uri) == data
    assert storage.digest(uri) == digest and storage.exists(uri)
    s3.put_object(Bucket="data", Key="foreign.bin", Body=b"no metadata")  # written by another tool
    assert storage.digest("s3://data/foreign.bin") == hashlib.sha256(b"no metadata").hexdigest()
    storage.copy(uri, "s3://results/copy.bin")
    assert storage.list_uris("s3://results") == ["s3://results/copy.bin"]
    assert storage.list_uris("s3://data/some") == [uri]
    local = storage.fetch_to_local(uri, tmp_path)
    assert local.read_bytes() == data and local.parent.name == digest
    storage.delete(uri)
    assert storage.digest(uri) is None


def test_s3_missing_objects_and_buckets_are_input_errors(s3):
    with pytest.raises(InputError, match="not found"):
        storage.read_bytes("s3://data/missing.png")
    with pytest.raises(InputError):
        storage.read_bytes("s3://no-such-bucket/x.png")
    with pytest.raises(InputError, match="needs a bucket"):
        storage.read_bytes("s3:///x.png")


def test_unreachable_endpoint_is_transient(monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(TransientStorageError):
        storage.read_bytes("s3://data/x.png")
