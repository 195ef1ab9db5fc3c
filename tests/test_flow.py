"""The flow on tiny items with the real core (random weights, 48 px, 3 iterations per pass) and Prefect's test API.

Cache behaviour is asserted on ``tasks.stages.COMPUTED``, which records (stage, item) only when a task body really
ran a core stage, never on timings.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_BACKBONE, TEST_WEIGHTS, TINY_SIZE, make_dataset

from flows.harmonize import ItemsFailed, ManifestError, harmonize_manifest
from flows.summary import ARTIFACT_KEY, read_summary, rerun_ids
from harmonize_core import demo_data
from harmonize_core.config import preset
from harmonize_core.errors import InputError
from harmonize_core.passes import stages as core_stages
from harmonize_core.passes.stages import STAGES
from tasks import caching, storage
from tasks.storage import TransientStorageError

ALL = set(STAGES)


def run(manifest: Path | str, out: Path | str, **options):
    """Run the flow; return (final state, its result: the summary dict or the raised exception)."""
    state = harmonize_manifest(manifest=str(manifest), out=str(out), backbone=TEST_BACKBONE, weights=TEST_WEIGHTS,
                               device="cpu", return_state=True, **options)
    return state, state.result(raise_on_failure=False)


def computed(log) -> set[tuple[str, str]]:
    return set(log.runs())


def summary_rows(result) -> dict[str, dict[str, str]]:
    uri = result["summary"] if isinstance(result, dict) else result.summary_uri
    return {row["id"] or row["row"]: row for row in read_summary(uri)}


# --- cache keys (no Prefect API needed) ---------------------------------------------------------------------------

def _key(stage: str, config=None, weights="w1", **digests):
    base = {"content": "c", "style": "s", "mask": "m"}
    return caching.stage_cache_key(stage, {**base, **digests}, config or preset("quick"), weights)


def test_cache_key_is_content_addressed():
    quick = preset("quick")
    assert _key("pass1") == _key("pass1")
    assert _key("pass1", mask="m2") != _key("pass1")
    assert _key("pass1", weights="w2") != _key("pass1")
    assert _key("dilate", weights="w2") == _key("dilate")  # only the network stages depend on the weights
    tau = quick.replace(**{"pass2.tau": 2.0})
    assert _key("pass2", tau) != _key("pass2") and _key("pass1", tau) == _key("pass1")
    iters = quick.replace(**{"pass1.iterations": 7})
    assert _key("pass1", iters) != _key("pass1") and _key("dilate", iters) == _key("dilate")
    post = quick.replace(**{"post.patch_size": 5})
    assert _key("reconstruct", post) != _key("reconstruct") and _key("pass2", post) == _key("pass2")
    # A weights file's path is not part of the key (its digest is); named sources are.
    moved = [quick.replace(**{"backbone.weights": path}) for path in ("/a/w.pth", "s3://b/w.pth", "/a/w.pth#caffe")]
    assert _key("pass1", moved[0]) == _key("pass1", moved[1]) != _key("pass1")
    assert _key("pass1", moved[2]) != _key("pass1", moved[0])  # the input convention changes the features


def test_cache_policy_ignores_location_id_and_device():
    item = {"id": "x", "row": 2, "config": preset("quick").to_dict(),
            "files": {k: {"uri": f"/{k}.png", "sha256": k[0]} for k in ("content", "style", "mask")}}
    loose = {"uri": "/o/x/dilate.png", "sha256": "d"}
    policy = caching.StageCache(stage="pass1")
    key = policy.compute_key(None, {"item": item, "loose": loose, "backbone": {"digest": "w"}, "out": "/o",
                                    "device": "cpu"}, {})
    moved = {**item, "id": "y", "row": 9, "files": {k: {**v, "uri": "s3://b/" + k} for k, v in item["files"].items()}}
    other = policy.compute_key(None, {"item": moved, "loose": {**loose, "uri": "s3://o/y/dilate.png"},
                                      "backbone": {"digest": "w"}, "out": "s3://o", "device": "cuda"}, {})
    assert key == other
    assert caching.config_from_dict(preset("quick").to_dict()) == preset("quick")


def test_policies_sit_on_the_task_decorators():
    from tasks import stages

    assert {name for name, t in stages.STAGE_TASKS.items() if stages.GPU_TAG in t.tags} == {
        "pass1", "pass2", "reconstruct"}
    for stage_task in stages.STAGE_TASKS.values():
        assert stage_task.retries == 3 and stage_task.retry_delay_seconds == [2.0, 4.0, 8.0]
        assert stage_task.retry_condition_fn is stages.retry_on_transient
        assert isinstance(stage_task.cache_policy, caching.StageCache)
    assert stages.is_transient(TransientStorageError("reset")) and stages.is_transient(TimeoutError())
    assert not stages.is_transient(InputError("bad")) and not stages.is_transient(RuntimeError("bug"))


def test_deployments_are_scheduled_one_run_at_a_time_and_found_by_module():
    from flows.fleet.deploy import deployment, shard_deployment
    from flows.fleet.settings import COORDINATOR_QUEUE, SHARD_QUEUE, SHARD_TAG

    nightly = deployment("s3://data/m.csv", "s3://results/nightly", preset="paper", device="cuda", work_pool="gpus")
    assert nightly.name == "nightly" and nightly.work_pool_name == "gpus"
    assert nightly.work_queue_name == COORDINATOR_QUEUE and nightly.entrypoint == "flows.harmonize.harmonize_manifest"
    assert nightly.parameters == {"manifest": "s3://data/m.csv", "out": "s3://results/nightly", "preset": "paper",
                                  "device": "cuda", "pool": "gpus"}
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.concurrency_limit == 1
    shards = shard_deployment("gpus")
    assert (shards.name, shards.work_queue_name, shards.entrypoint) == ("gpus", SHARD_QUEUE,
                                                                        "flows.shard.harmonize_shard")
    assert shards.job_variables["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert SHARD_TAG in shards.tags  # what the zombie automation watches


def test_a_fan_out_says_when_the_zombie_automation_is_missing_disabled_or_out_of_date(prefect_session):
    from prefect.automations import Automation
    from prefect.events.schemas.automations import EventTrigger

    from flows.fleet.automation import ensure_zombie_automation, zombie_automation_problem
    from flows.fleet.settings import AUTOMATION_NAME

    assert zombie_automation_problem() == f"the automation {AUTOMATION_NAME!r} is missing"
    automation = ensure_zombie_automation(40)
    try:
        assert zombie_automation_problem() is None
        automation.disable()
        assert zombie_automation_problem() == f"the automation {AUTOMATION_NAME!r} is disabled"
        automation = ensure_zombie_automation(40)  # deploy again: enabled, and the trigger is current
        assert zombie_automation_problem() is None
        old = Automation.read(name=AUTOMATION_NAME)  # what an earlier release created: heartbeats only, every run
        old.trigger = EventTrigger(after={"prefect.flow-run.heartbeat"}, expect=set(old.trigger.expect),
                                   match=old.trigger.match, for_each={"prefect.resource.id"},
                                   posture=old.trigger.posture, threshold=1, within=old.trigger.within)
        old.update()
        assert zombie_automation_problem() == f"the automation {AUTOMATION_NAME!r} is out of date"
    finally:
        Automation.read(name=AUTOMATION_NAME).delete()


# --- flow runs ------------------------------------------------------------------------------------------------------

def _replace_mask(path: Path) -> None:
    height, width = TINY_SIZE, TINY_SIZE * 4 // 3
    mask = np.zeros((height, width), np.uint8)
    mask[10:30, 20:44] = 255
    path.write_bytes(demo_data.encode(mask, "PNG"))


def test_reruns_recompute_only_what_changed(prefect_api, tiny_manifest, tmp_path):
    out = tmp_path / "out"
    state, result = run(tiny_manifest, out)
    assert state.is_completed(), result
    assert computed(prefect_api) == {(s, i) for s in ALL for i in "ab"}
    for item_id in "ab":
        for stage in STAGES:
            assert storage.exists(storage.uri_for(str(out), item_id, stage, "png"))
            metrics = json.loads(Path(storage.uri_for(str(out), item_id, stage, "json")).read_text())
            assert metrics["stage"] == stage and metrics["item"] == item_id
    rows = summary_rows(result)
    assert {r["status"] for r in rows.values()} == {"completed"} and rows["a"]["cached"] == ""
    assert float(rows["a"]["pass2_loss"]) > 0 and rows["b"]["final_uri"] == str(out / "b" / "reconstruct.png")
    assert Path(result["summary"]).parent.parent == out / "runs"
    records = sorted(p.name.split("-")[0] for p in (out / ".cache").iterdir() if p.is_file())
    assert records == sorted(STAGES * 2)
    objects = {p.name for p in (out / ".cache" / "objects").iterdir()}
    for item_id in "ab":  # every output also lives as an immutable object named by its digest
        assert {f"{storage.digest(storage.uri_for(str(out), item_id, s, 'png'))}.png" for s in STAGES} <= objects
    assert not list((out / ".cache" / "locks").glob("*.lock"))  # every stage lock was released

    prefect_api.clear()
    state, result = run(tiny_manifest, out)
    assert state.is_completed() and computed(prefect_api) == set()
    assert {r["cached"] for r in summary_rows(result).values()} == {";".join(STAGES)}

    _replace_mask(tiny_manifest.parent / "b" / "mask.png")  # a curator edits one row's mask
    prefect_api.clear()
    run(tiny_manifest, out)
    assert computed(prefect_api) == {(s, "b") for s in ALL}

    prefect_api.clear()
    run(tiny_manifest, out, overrides={"tau": 2.0})  # a pass2 setting: pass2 and what follows
    assert computed(prefect_api) == {(s, i) for s in ("pass2", "reconstruct") for i in "ab"}

    text = tiny_manifest.read_text().splitlines()
    text[1] = text[1].replace(",48,3,3", ",48,4,3")  # row a: pass1_iters 3 -> 4
    tiny_manifest.write_text("\n".join(text) + "\n")
    pass2_before = storage.digest(str(out / "a" / "pass2.png"))
    prefect_api.clear()
    state, result = run(tiny_manifest, out, overrides={"tau": 2.0})
    # pass1 and everything downstream of it; reconstruct only if pass2's output bytes changed (content-addressed:
    # pass2 starts from the composite and uses pass 1 only for its mapping, which at 48 px may not change)
    pass2_changed = storage.digest(str(out / "a" / "pass2.png")) != pass2_before
    expected = {"pass1", "blend", "pass2"} | ({"reconstruct"} if pass2_changed else set())
    assert computed(prefect_api) == {(s, "a") for s in expected}
    rows = summary_rows(result)
    assert rows["a"]["cached"] == ("dilate" if pass2_changed else "dilate;reconstruct")
    assert rows["b"]["cached"] == ";".join(STAGES)


def test_identical_rows_share_records_and_missing_outputs_are_restored(prefect_api, tiny_manifest, tmp_path):
    out = tmp_path / "out"
    run(tiny_manifest, out, only_ids=["a"])
    lines = tiny_manifest.read_text().splitlines()
    twin = tmp_path / "twin.csv"  # another id with a's files: same keys, outputs copied to its own folder
    twin.write_text("\n".join([lines[0], lines[1], lines[1].replace("a,", "twin,", 1)]).replace(",a/", ",data/a/")
                    + "\n")
    prefect_api.clear()
    state, _ = run(twin, out)
    assert state.is_completed() and computed(prefect_api) == set()
    for stage in STAGES:
        ours, theirs = (storage.uri_for(str(out), i, stage, "png") for i in ("twin", "a"))
        assert storage.digest(ours) == storage.digest(theirs) is not None
    pass2_digest = storage.digest(str(out / "a" / "pass2.png"))
    (out / "a" / "pass2.png").unlink()  # an item's readable copy deleted: restored from its object, no compute
    prefect_api.clear()
    run(twin, out, only_ids=["a"])
    assert computed(prefect_api) == set() and storage.digest(str(out / "a" / "pass2.png")) == pass2_digest
    (out / ".cache" / "objects" / f"{pass2_digest}.png").unlink()  # the object itself gone: recomputed
    prefect_api.clear()
    run(twin, out, only_ids=["a"])
    assert computed(prefect_api) == {("pass2", "a")}  # same bytes again, so reconstruct stays a hit
    assert storage.digest(str(out / ".cache" / "objects" / f"{pass2_digest}.png")) == pass2_digest


def test_bad_rows_are_reported_and_the_others_complete(prefect_api, tmp_path):
    manifest = make_dataset(tmp_path / "data", ids=("a", "corrupt", "nomask"))
    folder = manifest.parent
    (folder / "corrupt" / "composite.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "nomask" / "mask.png").unlink()
    state, result = run(manifest, tmp_path / "out")
    assert state.is_failed() and isinstance(result, ItemsFailed)
    assert "2 of 3 items failed" in str(result)
    rows = summary_rows(result)
    assert rows["a"]["status"] == "completed"
    assert rows["corrupt"]["status"] == "invalid" and "content:" in rows["corrupt"]["error"]
    assert "not a readable image" in rows["corrupt"]["error"]
    assert rows["nomask"]["status"] == "invalid" and "mask:" in rows["nomask"]["error"]
    assert "file not found" in rows["nomask"]["error"] and "\n" not in rows["nomask"]["error"]
    assert computed(prefect_api) == {(s, "a") for s in ALL}
    assert not (tmp_path / "out" / "corrupt").exists()
    assert rerun_ids(result.summary_uri) == ["corrupt", "nomask"]


def test_a_failing_stage_is_isolated_not_retried_and_rerun_alone(prefect_api, tiny_manifest, tmp_path, monkeypatch):
    from tasks import stages as stage_tasks

    real_pass1, real_load, calls = core_stages.pass1, stage_tasks.load_inputs, []

    def tagged_load(item, device):  # mark the inputs with their item so the fake stage can pick b
        inputs, config = real_load(item, device)
        inputs.item_id = item["id"]
        return inputs, config

    def broken_for_b(inputs, loose, backbone, config, progress=None):
        calls.append(inputs.item_id)
        if inputs.item_id == "b":
            raise InputError("b: pretend the painting is unusable")
        return real_pass1(inputs, loose, backbone, config, progress)

    monkeypatch.setattr(stage_tasks, "load_inputs", tagged_load)
    monkeypatch.setattr(stage_tasks.core, "pass1", broken_for_b)
    state, result = run(tiny_manifest, tmp_path / "out")
    assert state.is_failed() and isinstance(result, ItemsFailed) and result.failed == 1
    rows = summary_rows(result)
    assert rows["a"]["status"] == "completed"
    assert rows["b"]["status"] == "failed"
    assert rows["b"]["error"] == "pass1: b: pretend the painting is unusable"
    assert rows["b"]["cached"] == "" and rows["b"]["dilate_uri"] and not rows["b"]["pass2_uri"]
    assert sorted(calls) == ["a", "b"]  # one attempt each: bad input is never retried

    monkeypatch.setattr(stage_tasks.core, "pass1", real_pass1)
    prefect_api.clear()
    state, result = run(tiny_manifest, tmp_path / "out", only_ids=rerun_ids(result.summary_uri))
    assert state.is_completed()
    assert computed(prefect_api) == {(s, "b") for s in ("pass1", "blend", "pass2", "reconstruct")}
    assert list(summary_rows(result)) == ["b"]


def test_a_stage_past_its_deadline_fails_once_with_one_line(prefect_api, tmp_path, monkeypatch):
    from tasks import stages as stage_tasks

    # pass 2 runs exactly its iterations (no convergence test), so 100000 of them meet the deadline
    manifest = make_dataset(tmp_path / "data", ids=("slow",), overrides={"size": "48", "pass1_iters": "3",
                                                                          "pass2_iters": "100000"})
    real_pass2, calls = core_stages.pass2, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real_pass2(*args, **kwargs)

    monkeypatch.setattr(stage_tasks.core, "pass2", counted)
    # pass 2 at its default rate diverges within ~10 evaluations on random weights (a DivergedError): slower here
    state, result = run(manifest, tmp_path / "out", overrides={"max_seconds": 1.5, "pass2.learning_rate": 0.01})
    assert state.is_failed() and isinstance(result, ItemsFailed)
    row = summary_rows(result)["slow"]
    assert row["error"].startswith("pass2: stopped after ") and "limit 1.5 s; raise max_seconds" in row["error"]
    assert "\n" not in row["error"] and calls == [1]  # a deadline is never retried
    assert float(row["pass2_s"]) < 30 and row["pass1_uri"]


def test_a_transient_storage_failure_is_retried(prefect_api, tiny_manifest, tmp_path, monkeypatch):
    out = tmp_path / "out"
    target = storage.uri_for(str(out), "a", "pass1", "png")
    real_write, attempts = storage.write_bytes, []

    def flaky_write(uri, data):
        if uri == target:
            attempts.append(uri)
            if len(attempts) == 1:
                raise TransientStorageError(f"{uri}: connection reset by peer")
        return real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", flaky_write)
    state, result = run(tiny_manifest, out, only_ids=["a"])
    assert state.is_completed(), result
    assert len(attempts) == 2
    assert Path(target).is_file() and summary_rows(result)["a"]["status"] == "completed"


def test_strict_mode_refuses_a_manifest_with_any_invalid_row(prefect_api, tiny_manifest, tmp_path):
    (tiny_manifest.parent / "b" / "mask.png").unlink()
    state, result = run(tiny_manifest, tmp_path / "out", strict=True)
    assert state.is_failed() and isinstance(result, ManifestError)
    assert "--strict" in str(result) and "row 3, column mask" in str(result)
    assert computed(prefect_api) == set()
    written = {p.name for p in (tmp_path / "out").iterdir()} if (tmp_path / "out").exists() else set()
    assert written <= {".cache"}  # at most the input index: no outputs, no run folder


def test_summary_artifact_and_csv_columns(prefect_api, tiny_manifest, tmp_path):
    from prefect.artifacts import Artifact

    _, result = run(tiny_manifest, tmp_path / "out", only_ids=["b"])
    artifact = Artifact.get(ARTIFACT_KEY)
    table = json.loads(artifact.data)
    assert [row["id"] for row in table] == ["b"] and table[0]["status"] == "completed"
    assert "1 completed, 0 failed, 0 invalid" in artifact.description
    progress = Artifact.get("harmonize-run-progress")  # outputs done of total, updated as items finish
    assert float(progress.data) == 100.0 and progress.description.startswith("1 of 1 outputs done")
    with open(result["summary"], newline="") as stream:
        header = next(csv.reader(stream))
    assert header[:9] == ["id", "variant", "row", "status", "error", "warnings", "cached", "worker", "tau"]
    assert {f"{s}_s" for s in STAGES} | {f"{s}_uri" for s in STAGES} <= set(header)


@pytest.mark.parametrize("bad", [{"size": 8}, {"tau": "-1"}])
def test_bad_run_settings_fail_before_any_row(prefect_api, tiny_manifest, tmp_path, bad):
    state, result = run(tiny_manifest, tmp_path / "out", overrides=bad)
    assert state.is_failed() and isinstance(result, InputError) and "run settings" in str(result)
