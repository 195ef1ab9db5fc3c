"""Curators' tools around a run: the plan before it, tau variants, extra columns, the report and status.csv after it."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from conftest import TEST_BACKBONE, TEST_WEIGHTS, make_dataset

from flows.cli.main import main
from flows.harmonize import harmonize_manifest, input_index
from flows.plan import CACHED, NEW, STALE, plan_run, why_stale
from flows.summary import STATUS_NAME, read_summary, rerun_ids
from harmonize_core.config import preset
from harmonize_core.network import vgg
from harmonize_core.network import weights as weights_module
from harmonize_core.passes.stages import STAGES
from manifests import RunSettings, validate_manifest
from tasks import backbones, caching, code_digest, weights_fetch
from tasks.backbones import backbone_spec

FLAGS = ["--backbone", TEST_BACKBONE, "--weights", TEST_WEIGHTS, "--device", "cpu"]


def run(manifest: Path, out: Path, **options):
    state = harmonize_manifest(manifest=str(manifest), out=str(out), backbone=TEST_BACKBONE, weights=TEST_WEIGHTS,
                               device="cpu", return_state=True, **options)
    return state.result(raise_on_failure=False)


def plan_of(manifest: Path, out: Path, **overrides):
    settings = RunSettings(preset="paper", overrides=overrides).with_overrides(backbone=TEST_BACKBONE,
                                                                             weights=TEST_WEIGHTS)
    report = validate_manifest(str(manifest), settings, index=input_index(str(out)))
    digest = backbone_spec(report.items[0].config, "cpu")["digest"]
    return plan_run(report, str(out), digest)


def statuses(plan) -> dict[tuple[str, str], dict[str, tuple[str, str]]]:
    return {(item.id, item.variant): {s.stage: (s.status, s.reason) for s in item.stages} for item in plan.items}


def test_a_plan_names_what_an_edit_recomputes_and_why_without_computing(prefect_api, tiny_manifest, tmp_path,
                                                                        monkeypatch):
    out = tmp_path / "out"
    fresh = plan_of(tiny_manifest, out)
    assert {s for stages in statuses(fresh).values() for s, _ in stages.values()} == {NEW}
    assert "2 output(s) of 2 to compute" in fresh.total_line() and "about" in fresh.total_line()
    run(tiny_manifest, out)
    again = plan_of(tiny_manifest, out)
    assert {s for stages in statuses(again).values() for s, _ in stages.values()} == {CACHED}
    assert again.total_line().endswith("everything is cached")

    lines = tiny_manifest.read_text().splitlines()
    lines[2] = lines[2].replace(",48,3,3", ",48,3,4")  # row b: pass2_iters 3 -> 4
    tiny_manifest.write_text("\n".join(lines) + "\n")
    prefect_api.clear()
    edited = statuses(plan_of(tiny_manifest, out))
    assert prefect_api.runs() == []  # planning computes nothing
    assert {s: v[0] for s, v in edited[("a", "")].items()} == dict.fromkeys(STAGES, CACHED)
    b = edited[("b", "")]
    assert [b[s][0] for s in ("dilate", "pass1", "blend")] == [CACHED] * 3
    assert b["pass2"] == (STALE, "setting pass2.iterations 3 -> 4")
    assert b["reconstruct"] == (STALE, "upstream pass2 recomputes")

    # an upgrade that changes one stage's computation: that stage and the ones after it (through its output)
    installed = code_digest.installed_code_digests()
    upstream = {s: f"upstream {before} recomputes" for before, s in zip(STAGES, STAGES[1:], strict=False)}
    for stage, stale in (("pass1", STAGES[1:]), ("reconstruct", STAGES[-1:])):
        monkeypatch.setattr(caching, "installed_code_digests", lambda stage=stage: {**installed, stage: "upgraded"})
        upgraded = statuses(plan_of(tiny_manifest, out))[("a", "")]
        assert upgraded == {s: (STALE, "code changed" if s == stage else upstream[s]) if s in stale else (CACHED, "")
                            for s in STAGES}
    monkeypatch.setattr(caching, "installed_code_digests", lambda: installed)

    (tiny_manifest.parent / "a" / "mask.png").write_bytes((tiny_manifest.parent / "b" / "mask.png").read_bytes())
    changed = statuses(plan_of(tiny_manifest, out))[("a", "")]
    assert changed["dilate"] == (STALE, "input mask changed")
    assert changed["pass1"] == (STALE, "upstream dilate recomputes")


def test_an_older_records_settings_are_compared_by_meaning():
    digests = {"content": "c", "style": "s", "mask": "m", "loose": "l", "blended": "b"}
    now = caching.key_payload("pass2", digests, preset("quick"), "w")
    before = json.loads(json.dumps({**now, "code": "an older core"}))
    before["config"]["pass2"].update(tau=None, stop_every=10)  # how an older version recorded tau 5, early stop off
    assert why_stale(before, now) == "code changed"
    before["config"]["pass2"]["tau"] = 2
    assert why_stale(before, now) == "code changed; setting pass2.tau 2.0 -> 5.0"


@pytest.mark.parametrize(("backbone", "weights"), [("vgg16", "offline-vgg16"), ("vgg19", "imagenet"),
                                                  (TEST_BACKBONE, TEST_WEIGHTS)])
def test_a_plan_on_a_new_output_folder_loads_no_network(tiny_manifest, tmp_path, monkeypatch, capsys, backbone,
                                                         weights):
    def refuse(*args, **kwargs):
        pytest.fail("harmonize plan loaded weights, downloaded them or built a network")

    torch_home, cache = tmp_path / "torch", tmp_path / "weights-cache"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv(weights_module.CACHE_DIR_ENV, str(cache))
    for name in (weights_fetch.OFFLINE_WHEEL_ENV, weights_module.CAFFE_VGG19_ENV):
        monkeypatch.delenv(name, raising=False)
    for owner, name in ((weights_module, "load_state_dict"), (vgg, "load_backbone"), (backbones, "load_backbone"),
                        (vgg.VGGFeatures, "__init__"), (weights_fetch.subprocess, "run"),
                        (weights_fetch, "fetch_weights"), (backbones, "fetch_weights"),
                        (torch.hub, "download_url_to_file")):
        monkeypatch.setattr(owner, name, refuse)
    out = tmp_path / "new-out"
    flags = ["--backbone", backbone, "--weights", weights, "--device", "cpu", "--json"]
    assert main(["plan", str(tiny_manifest), "--out", str(out), *flags]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [(item["id"], [s["status"] for s in item["stages"]]) for item in plan["items"]] == [
        ("a", [NEW] * len(STAGES)), ("b", [NEW] * len(STAGES))]
    assert not torch_home.exists() and not cache.exists()


def test_tau_variants_share_pass1_and_each_get_a_pass2(prefect_api, tmp_path):
    manifest = make_dataset(tmp_path / "data", ids=("a",))
    lines = manifest.read_text().splitlines()
    manifest.write_text(f"{lines[0]},tau,notes\n{lines[1]},1;5,from the attic\n")
    out = tmp_path / "out"
    result = run(manifest, out)
    assert isinstance(result, dict), result
    assert sorted(prefect_api.runs()) == sorted([("dilate", "a"), ("pass1", "a"), ("blend", "a"), ("pass2", "a"),
                                                 ("pass2", "a"), ("reconstruct", "a"), ("reconstruct", "a")])
    rows = {r["variant"]: r for r in read_summary(result["summary"])}
    assert set(rows) == {"tau-1", "tau-5"} and {r["id"] for r in rows.values()} == {"a"}
    assert [float(rows[v]["tau"]) for v in ("tau-1", "tau-5")] == [1.0, 5.0]
    assert rows["tau-1"]["final_uri"] == str(out / "a" / "tau-1" / "reconstruct.png")
    assert rows["tau-1"]["pass1_uri"] == rows["tau-5"]["pass1_uri"] == str(out / "a" / "pass1.png")
    assert rows["tau-1"]["notes"] == "from the attic"  # an extra manifest column reaches the summary
    assert all((out / "a" / v / f"{s}.png").is_file() for v in rows for s in ("pass2", "reconstruct"))
    status = {(r["id"], r["variant"]): r for r in read_summary(str(out / STATUS_NAME))}
    assert set(status) == {("a", "tau-1"), ("a", "tau-5")} and status[("a", "tau-1")]["status"] == "completed"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("src", "href") and value]


def test_a_run_ends_with_its_report_and_status_and_only_failed_takes_status_csv(prefect_api, tmp_path, capsys):
    manifest = make_dataset(tmp_path / "data", ids=("good", "bad"))
    mask = manifest.parent / "bad" / "mask.png"
    saved = mask.read_bytes()
    mask.write_bytes(b"broken")
    out = tmp_path / "out"
    assert main(["run", str(manifest), "--out", str(out), *FLAGS]) == 1
    err = capsys.readouterr().err
    report = Path(err.split("report: ")[-1].strip())
    assert report.is_file() and report.name == "report.html"
    parser = _Links()
    parser.feed(report.read_text())
    files = [link for link in parser.links if not link.startswith(("#", "http"))]
    assert files and all((report.parent / link.split("#")[0]).resolve().exists() for link in files)
    status = out / STATUS_NAME
    assert {r["id"]: r["status"] for r in read_summary(str(status))} == {"good": "completed", "bad": "invalid"}
    assert rerun_ids(str(status)) == ["bad"]
    mask.write_bytes(saved)
    prefect_api.clear()
    assert main(["run", str(manifest), "--out", str(out), "--only-failed", str(status), *FLAGS]) == 0
    assert {i for _, i in prefect_api.runs()} == {"bad"}
    assert {r["id"]: r["status"] for r in read_summary(str(status))} == {"good": "completed", "bad": "completed"}
    capsys.readouterr()
    assert main(["plan", str(manifest), "--out", str(out), "--json", *FLAGS]) == 0
    assert json.loads(capsys.readouterr().out)["total"].endswith("everything is cached")


def test_a_killed_runs_finished_rows_rebuild_its_summary_and_report(prefect_api, tiny_manifest, tmp_path, capsys):
    from flows.summary import read_finished_rows
    from tasks import storage

    out = tmp_path / "out"
    result = run(tiny_manifest, out)
    run_id = result["run_id"]
    summary = Path(result["summary"])
    summary.unlink()  # as if the coordinator died before writing its summary: only the rows remain
    (summary.parent / "report.html").unlink()
    assert {r["id"] for r in read_finished_rows(str(out), run_id)} == {"a", "b"}
    assert main(["report", "--out", str(out), "--run", run_id]) == 0
    assert capsys.readouterr().out.strip() == str(summary.parent / "report.html")
    assert {r["id"]: r["status"] for r in read_summary(str(summary))} == {"a": "completed", "b": "completed"}
    assert storage.exists(str(summary.parent / "report.html"))
