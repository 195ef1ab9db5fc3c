"""The flow against a real S3-compatible HTTP server on loopback (moto), reached only through AWS_ENDPOINT_URL_S3.

The manifest is read from S3 with paths relative to its prefix, every output, metrics file, cache record and the
summary land in S3, and a second run finds its cache records there (no stage computes).
"""

from __future__ import annotations

from pathlib import Path

from conftest import TEST_BACKBONE, TEST_WEIGHTS, make_dataset

from flows.harmonize import ItemsFailed, harmonize_manifest
from flows.summary import read_summary
from harmonize_core.passes.stages import STAGES
from tasks import caching, storage

MANIFEST = "s3://data/sets/tiny/manifest.csv"
OUT = "s3://results/runs-test"


def upload(s3, folder: Path, prefix: str = "sets/tiny") -> None:
    for path in sorted(folder.rglob("*.*")):
        s3.put_object(Bucket="data", Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())


def run(**options):
    state = harmonize_manifest(manifest=MANIFEST, out=OUT, backbone=TEST_BACKBONE, weights=TEST_WEIGHTS,
                               device="cpu", return_state=True, **options)
    return state, state.result(raise_on_failure=False)


def test_manifest_outputs_summary_and_cache_live_in_s3(prefect_api, s3, tmp_path):
    upload(s3, make_dataset(tmp_path / "data").parent)
    state, result = run()
    assert state.is_completed(), result
    assert set(prefect_api.runs()) == {(s, i) for s in STAGES for i in "ab"}
    written = set(storage.list_uris(OUT))
    for item_id in "ab":
        for stage in STAGES:
            assert storage.uri_for(OUT, item_id, stage, "png") in written
            assert storage.uri_for(OUT, item_id, stage, "json") in written
    records = [u for u in written if u.startswith(storage.cache_uri(OUT) + "/") and u.count("/") == OUT.count("/") + 2]
    assert sorted(u.rsplit("/", 1)[1].split("-")[0] for u in records) == sorted(STAGES * 2)
    assert caching.result_storage_for(OUT).startswith("s3-bucket/harmonize-cache-")
    summary = result["summary"]
    assert summary.startswith(f"{OUT}/runs/") and summary.endswith("/summary.csv")
    rows = read_summary(summary)
    assert [(r["id"], r["status"]) for r in rows] == [("a", "completed"), ("b", "completed")]
    assert rows[0]["final_uri"] == f"{OUT}/a/reconstruct.png"
    head = s3.head_object(Bucket="results", Key="runs-test/a/reconstruct.png")
    assert head["Metadata"]["sha256"] == storage.digest(rows[0]["final_uri"])

    prefect_api.clear()
    state, result = run()
    assert state.is_completed() and prefect_api.runs() == []  # every record found in S3
    assert {r["cached"] for r in read_summary(result["summary"])} == {";".join(STAGES)}


def test_bad_rows_in_an_s3_manifest_are_reported_in_the_s3_summary(prefect_api, s3, tmp_path):
    folder = make_dataset(tmp_path / "data", ids=("a", "corrupt", "nomask")).parent
    (folder / "corrupt" / "painting.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "nomask" / "mask.png").unlink()
    upload(s3, folder)
    state, result = run()
    assert state.is_failed() and isinstance(result, ItemsFailed)
    rows = {r["id"]: r for r in read_summary(result.summary_uri)}
    assert rows["a"]["status"] == "completed"
    assert rows["corrupt"]["status"] == "invalid" and "style:" in rows["corrupt"]["error"]
    assert "s3://data/sets/tiny/corrupt/painting.jpg: not a readable image" in rows["corrupt"]["error"]
    assert rows["nomask"]["error"] == "mask: s3://data/sets/tiny/nomask/mask.png: not found (check the path, " \
                                      "the bucket and AWS_ENDPOINT_URL)"
    assert not storage.list_uris(f"{OUT}/corrupt")


def test_s3_weights_are_downloaded_once_and_keyed_by_content(s3, tmp_path, monkeypatch):
    import torch

    from harmonize_core.config import preset
    from harmonize_core.network.weights import CACHE_DIR_ENV, file_sha256, random_state_dict
    from tasks.backbones import backbone_spec, load_for_task

    local = tmp_path / "vgg16.pth"
    torch.save(random_state_dict("vgg16", 3), local)
    s3.put_object(Bucket="data", Key="weights/vgg16.pth", Body=local.read_bytes())
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    config = preset("quick").replace(**{"backbone.name": "vgg16", "backbone.weights": "s3://data/weights/vgg16.pth"})
    spec = backbone_spec(config, "cpu")
    assert spec["digest"] == file_sha256(local) and spec["weights"] == "s3://data/weights/vgg16.pth"
    assert list((tmp_path / "cache").rglob("vgg16.pth")) == []  # naming the digest downloads nothing
    assert load_for_task(spec, "cpu").digest == spec["digest"]
    (downloaded,) = (tmp_path / "cache").rglob("vgg16.pth")
    assert downloaded.read_bytes() == local.read_bytes()
    moved = config.replace(**{"backbone.weights": "/elsewhere/vgg16.pth"})
    assert caching.key_section(moved, "pass1") == caching.key_section(config, "pass1")
