"""Shared fixtures: Prefect's test API, a real S3-compatible server on loopback, tiny demo datasets.

Nothing here is autouse: core unit tests never start Prefect or the S3 server.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")

TINY_SIZE = 48  # pixels: demo items for pipeline tests
TINY_OVERRIDES = {"size": str(TINY_SIZE), "pass1_iters": "3", "pass2_iters": "3"}
TEST_WEIGHTS = "random:0"  # tests only: no download, deterministic
TEST_BACKBONE = "vgg16"
S3_BUCKETS = ("data", "results")


@pytest.fixture(scope="session")
def prefect_session():
    """Prefect's temporary API and database for the whole session (started once; heartbeats off)."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60), \
            temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


@pytest.fixture
def prefect_api(prefect_session, tmp_path):
    """Per test: Prefect's default result storage in the test's own folder, and a fresh compute log."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.stages import COMPUTED

    COMPUTED.clear()
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        yield COMPUTED


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (real HTTP; boto3 reaches it only through AWS_ENDPOINT_URL_S3)."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL_S3")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
    yield os.environ["AWS_ENDPOINT_URL_S3"]
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3(s3_endpoint):
    """An emptied S3 server with buckets ``data`` and ``results``; returns a boto3 client."""
    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST"))
    from prefect_aws.credentials import _get_client_cached

    _get_client_cached.cache_clear()  # prefect-aws caches clients per credentials, endpoint included
    client = boto3.client("s3")
    for bucket in S3_BUCKETS:
        client.create_bucket(Bucket=bucket)
    return client


def make_dataset(folder: Path, ids: tuple[str, ...] = ("a", "b"), overrides: dict[str, str] | None = None) -> Path:
    """Write tiny demo items (``TINY_SIZE`` px, 3 iterations per pass) and their manifest; return its path."""
    from manifests.demo import write_demo

    return write_demo(folder, ids=ids, size=TINY_SIZE, overrides=TINY_OVERRIDES if overrides is None else overrides)


@pytest.fixture
def tiny_manifest(tmp_path) -> Path:
    """A two-item manifest (ids a, b) of tiny demo images under ``tmp_path/data``."""
    return make_dataset(tmp_path / "data")
