"""Paths mean the same in every process of a run: absolute where typed, refused or reported in one line elsewhere.

``harmonize run/plan/deploy/serve/report`` resolve relative paths against the folder they are typed in before
anything is handed to a flow, a deployment or a worker; a pooled run warns about local paths; a shard on a worker
that cannot see the run's output folder, or an item's input files, fails in one line without computing; a worker
command that would start no shard worker exits 2 in one line.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from conftest import TEST_BACKBONE, TEST_WEIGHTS, make_dataset

from flows import paths
from flows.cli import common as cli_common
from flows.cli import fleet as cli_fleet
from flows.cli import run as cli_run
from flows.cli.main import main
from flows.fleet import workers
from harmonize_core.errors import InputError
from harmonize_core.passes.stages import STAGES

TEST_FLAGS = ["--backbone", TEST_BACKBONE, "--weights", TEST_WEIGHTS, "--device", "cpu"]
SHARED_HINT = "give s3:// URIs, or put them on a disk every worker mounts at the same path"


def one_line(text: str, prefix: str = "harmonize: error: ") -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in text, text
    return lines[0]


@pytest.fixture
def typed_here(tmp_path, monkeypatch):
    """A tiny dataset under ``<tmp>/data``, the cwd set to ``<tmp>`` (where the user types), no Prefect server
    needed (``require_api`` answers); returns the cwd."""
    make_dataset(tmp_path / "data", ids=("a",))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("flows.fleet.deploy.require_api", lambda: "http://prefect.invalid/api")
    return tmp_path


def test_run_on_a_pool_hands_absolute_paths_to_the_flow_and_warns_once(typed_here, monkeypatch, capsys):
    captured = {}

    def fake_run_flow(manifest, out, args, only_ids=None):
        captured.update(manifest=manifest, out=out, only_ids=only_ids, parameters=cli_common.flow_parameters(args),
                        only_failed=args.only_failed)
        return 0

    monkeypatch.setattr(cli_run, "run_flow", fake_run_flow)
    Path("weights.pth").write_bytes(b"not read here")
    Path("status.csv").write_text("id,status,error\na,failed,boom\n")
    argv = ["run", "data/manifest.csv", "--out", "results/", "--pool", "P", "--only-failed", "status.csv",
            "--backbone", TEST_BACKBONE, "--weights", "weights.pth#caffe", "--device", "cpu"]
    assert main(argv) == 0
    assert captured == {"manifest": f"{typed_here}/data/manifest.csv", "out": f"{typed_here}/results",
                        "only_ids": ["a"], "only_failed": f"{typed_here}/status.csv",
                        "parameters": {"preset": "paper", "device": "cpu", "backbone": TEST_BACKBONE,
                                       "weights": f"{typed_here}/weights.pth#caffe", "overrides": {},
                                       "strict": False, "pool": "P", "shard_size": 1}}
    warning = one_line(capsys.readouterr().err, "harmonize: warning: ")
    assert warning == (f"harmonize: warning: manifest {typed_here}/data/manifest.csv, --out {typed_here}/results "
                       f"are local paths: every worker of pool P must see them at the same path, with the "
                       f"manifest's input files; otherwise {SHARED_HINT}")


def test_run_on_a_pool_with_s3_paths_does_not_warn_and_names_pass_through(monkeypatch, capsys):
    assert paths.local_paths_warning("P", {"manifest": "s3://data/m.csv", "--out": "s3://results/run"}) is None
    assert paths.absolute_weights("offline-vgg16") == "offline-vgg16"
    assert paths.absolute_weights("random:3#caffe") == "random:3#caffe"
    assert paths.absolute_weights("s3://w/vgg19.pth#caffe") == "s3://w/vgg19.pth#caffe"
    assert paths.absolute_weights(None) is None
    monkeypatch.chdir("/tmp")
    assert paths.absolute_weights("w#1.pth") == "/tmp/w#1.pth"  # a '#' that is not a convention suffix is the name
    assert paths.absolute_location("file://x/y", "--out") == "/tmp/x/y"
    assert paths.absolute_location("s3://bucket/run/", "--out") == "s3://bucket/run/"


@pytest.mark.parametrize("argv, fragment", [
    (["run", "data/manifest.csv", "--out", "gs://bucket/run"], "--out gs://bucket/run: only local paths and s3:// "
                                                              "URIs are supported"),
    (["plan", "https://host/m.csv", "--out", "out"], "manifest https://host/m.csv: only local paths and s3:// "
                                                     "URIs are supported"),
    (["run", "data/manifest.csv", "--out", " "], "--out: empty path: give a local path or an s3:// URI"),
    (["deploy", "--pool", "P", "data/manifest.csv", "--out", "s3:///run"], "--out s3:///run: an s3 URI needs a bucket, "
                                                                               "e.g. s3://bucket/path"),
])
def test_what_cannot_be_made_absolute_is_refused_in_one_line(typed_here, capsys, argv, fragment):
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err) == f"harmonize: error: {fragment}"


def test_deploy_stores_absolute_paths_in_the_nightly_deployment(typed_here, monkeypatch, capsys):
    from flows.fleet import deploy as fleet

    stored = {}

    def fake_deploy(pool, manifest, out, cron, zombie_seconds, **parameters):
        stored.update(fleet.deployment(manifest, out, cron=cron, work_pool=pool, **parameters).parameters)
        return {"pool": pool}

    monkeypatch.setattr(fleet, "deploy", fake_deploy)
    assert main(["deploy", "--pool", "P", "data/manifest.csv", "--out", "nightly", *TEST_FLAGS]) == 0
    assert (stored["manifest"], stored["out"], stored["pool"]) == (f"{typed_here}/data/manifest.csv",
                                                                   f"{typed_here}/nightly", "P")
    assert "harmonize: warning: manifest " in capsys.readouterr().err
    assert main(["deploy", "--pool", "P", "gone.csv", "--out", "nightly"]) == 2  # a relative path that is not there
    assert one_line(capsys.readouterr().err) == (f"harmonize: error: {typed_here}/gone.csv: manifest not found (give "
                                                 "a CSV path or s3:// URI)")


def test_serve_schedules_absolute_paths(typed_here, monkeypatch):
    served = {}

    class Flow:
        def serve(self, **options):
            served.update(options["parameters"])

    monkeypatch.setattr(cli_fleet, "manifest_flow", lambda args: Flow())
    assert main(["serve", "data/manifest.csv", "--out", "~/runs/nightly", *TEST_FLAGS]) == 0
    assert served["manifest"] == f"{typed_here}/data/manifest.csv"
    assert served["out"] == str(Path("~/runs/nightly").expanduser())


def test_report_and_plan_resolve_out_where_typed(typed_here, capsys):
    assert main(["report", "--out", "nowhere"]) == 2
    assert one_line(capsys.readouterr().err) == (f"harmonize: error: {typed_here}/nowhere: no run with a summary.csv "
                                                 "under runs/ (give --run ID)")
    assert main(["plan", "data/manifest.csv", "--out", "planned", "--json", *TEST_FLAGS]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert f"{typed_here}/data" in json.dumps(plan)  # the inputs were read through the absolute manifest path


def test_a_flow_started_by_a_deployment_refuses_relative_paths(monkeypatch):
    from prefect.context import FlowRunContext

    class Run:
        deployment_id = uuid.uuid4()

    class Context:
        flow_run = Run()

    paths.refuse_relative_when_deployed({"manifest": "m.csv", "out": "run"})  # not in a deployed run: nothing
    monkeypatch.setattr(FlowRunContext, "get", classmethod(lambda cls: Context()))
    paths.refuse_relative_when_deployed({"manifest": "/abs/m.csv", "out": "s3://b/run"})
    with pytest.raises(InputError) as refused:
        paths.refuse_relative_when_deployed({"manifest": "/abs/m.csv", "out": "run/"})
    assert str(refused.value) == ("out 'run/' is a relative path, which a worker would resolve against its own "
                                  "temporary folder: give an absolute path or an s3:// URI (the harmonize commands "
                                  "resolve relative paths where they are typed)")


def test_a_pooled_run_refuses_a_relative_out_before_sending_any_shard():
    from flows.fleet.fanout import FanOut

    with pytest.raises(InputError, match=r"^out 'rel/out' is a relative path, which a worker would resolve"):
        FanOut("rel/out", "run-1", {}, "cpu", "P", progress=None).run([], 1)


def shard_item(content: str) -> dict:
    files = {name: {"uri": content, "sha256": "0" * 64} for name in ("content", "style", "mask")}
    return {"id": "a", "row": 2, "files": files, "config": {}, "tau_variants": [], "extra": {}, "warnings": []}


def test_a_shard_that_cannot_see_the_output_folder_fails_in_one_line_and_computes_nothing(prefect_api, tmp_path,
                                                                                          monkeypatch):
    from flows.shard import harmonize_shard

    monkeypatch.setenv("HARMONIZE_WORKER_NAME", "box-gpu0")
    out = tmp_path / "elsewhere"  # the coordinator's disk, not this worker's: no marker here
    state = harmonize_shard(items=[shard_item(str(tmp_path / "c.png"))], out=str(out), backbone={}, run_id="run-1",
                            device="cpu", return_state=True)
    assert state.is_failed()
    assert state.message == (f"worker box-gpu0 cannot see the run's output folder {out}: {out}/runs/run-1/pool.json, "
                             f"written by the run that sent this shard, is not there; the workers must share the "
                             f"output storage: {SHARED_HINT}")
    assert not out.exists() and prefect_api.runs() == []  # nothing written, no stage computed

    monkeypatch.chdir(tmp_path)
    state = harmonize_shard(items=[shard_item("c.png")], out="run/", backbone={}, run_id="run-1", device="cpu",
                            return_state=True)
    assert state.is_failed() and state.message.startswith("out 'run/' is a relative path")
    assert not Path("run").exists() and prefect_api.runs() == []


def test_a_shard_fails_each_item_whose_inputs_this_worker_cannot_see(prefect_api, tmp_path, monkeypatch):
    from flows.shard import harmonize_shard
    from flows.summary import read_finished_rows

    monkeypatch.setenv("HARMONIZE_WORKER_NAME", "box-gpu0")
    out = str(tmp_path / "out")
    paths.write_pool_marker(out, "run-1", "P")
    assert json.loads(Path(paths.marker_uri(out, "run-1")).read_text())["pool"] == "P"
    missing = tmp_path / "on-the-coordinator" / "c.png"
    done = harmonize_shard(items=[shard_item(str(missing))], out=out, backbone={}, run_id="run-1", device="cpu")
    assert done == {"items": 1, "rows": 1, "failed": 1}
    [row] = read_finished_rows(out, "run-1")
    assert row["status"] == "failed" and row["worker"] == "box-gpu0"
    assert row["error"].startswith(f"content {missing} is not on this worker (") and row["error"].endswith(
        f"): the workers must see the manifest's input files at the same paths; {SHARED_HINT}")
    assert prefect_api.runs() == []  # no stage computed


def test_a_shard_with_the_marker_and_its_inputs_computes(prefect_api, tmp_path):
    from flows.shard import harmonize_shard
    from manifests import RunSettings, validate_manifest
    from tasks.backbones import backbone_spec

    manifest = make_dataset(tmp_path / "data", ids=("a",))
    run = RunSettings(preset="quick", overrides={"backbone": TEST_BACKBONE, "weights": TEST_WEIGHTS})
    [item] = validate_manifest(str(manifest), run).items
    out = str(tmp_path / "out")
    paths.write_pool_marker(out, "run-1", "P")
    done = harmonize_shard(items=[item.to_record()], out=out, backbone=backbone_spec(item.config, "cpu"),
                           run_id="run-1", device="cpu")
    assert done == {"items": 1, "rows": 1, "failed": 0}
    assert sorted(stage for stage, _ in prefect_api.runs()) == sorted(STAGES)


def test_a_worker_with_no_gpu_exits_2_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["worker", "--pool", "P"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "harmonize: error: worker: no GPU visible on this machine (CUDA_VISIBLE_DEVICES is empty), so no worker "
        "would take shards and runs would wait for ever: run it on a GPU machine, name the GPUs with --gpus 0,1, "
        "run shards on the CPU with --cpu N, or serve only the coordinator queue with --coordinator-only")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    assert main(["worker", "--pool", "P", "--no-coordinator"]) == 2
    assert "no GPU visible on this machine (torch sees no CUDA device)" in one_line(capsys.readouterr().err)
    for argv, message in ((["--cpu", "0"], "worker: --cpu 0: give the number of CPU shard workers to start, 1 or more"),
                          (["--gpus", "0", "--cpu", "1"], "worker: give one of --gpus, --cpu and --coordinator-only"),
                          (["--gpus", ","], "worker: --gpus ',' names no GPU, so no worker would take shards")):
        assert main(["worker", "--pool", "P", *argv]) == 2
        assert one_line(capsys.readouterr().err).startswith(f"harmonize: error: {message}")


def test_cpu_and_coordinator_only_workers_are_explicit(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(workers, "supervise", lambda pool, gpus, coordinator, cpu: started.append(
        (pool, gpus, coordinator, cpu)) or 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["worker", "--pool", "P", "--cpu", "2", "--no-coordinator"]) == 0
    assert main(["worker", "--pool", "P", "--coordinator-only"]) == 0
    assert started == [("P", [], False, 2), ("P", [], True, 0)]
    planned = workers.plan_workers([], coordinator=False, state_dir=tmp_path, cpu=2)
    assert [(w.name.rsplit("-", 1)[1], w.queue, w.env["CUDA_VISIBLE_DEVICES"]) for w in planned] == [
        ("cpu0", "gpu", ""), ("cpu1", "gpu", "")]
