"""The fleet as users run it, with real processes: a Prefect server, GPU workers, runs that compete or lose a machine.

Everything runs on the CPU: each "machine" is a ``harmonize worker`` supervisor pinned to a fake GPU id
(``CUDA_VISIBLE_DEVICES``), its rows carry ``<host>-gpu<id>``, and ``HARMONIZE_COMPUTE_LOG`` journals every stage that
really computed, whichever process computed it. The Prefect server runs on a throwaway PostgreSQL cluster on
loopback (``fleet_server``), as the README's fleet recipe says, and every test that uses it asserts that the server
logged no database lock, no state-validation error and no dead-lettered message. Runs are typed in a folder of
their own with relative paths, as a user types them. These tests are slow (a server, worker processes, a flow-run
process per shard, and a zombie-detection delay); CI runs them (``.ci/run`` installs PostgreSQL and sets
``HARMONIZE_REQUIRE_POSTGRES=1``, so a missing PostgreSQL fails there instead of skipping).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import TEST_BACKBONE, TEST_WEIGHTS, make_dataset
from fleet_server import free_port, postgres_cluster, require_postgres, server_log_errors, server_log_problems

from flows.fleet.settings import AUTOMATION_NAME
from flows.summary import read_summary
from harmonize_core.passes.stages import STAGES

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
POOL = "fleet-test"
ZOMBIE_SECONDS = 70  # heartbeats come every 30 s (Prefect's minimum): a shard is crashed after missing two
RUN_FLAGS = ["--backbone", TEST_BACKBONE, "--weights", TEST_WEIGHTS, "--device", "cpu"]
HOST = socket.gethostname()
NO_SERVER_PROBLEMS = {"database is locked": 0, "state validation errors": 0, "dead-lettered messages": 0,
                      "logged errors": 0}


def harmonize(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def descendants(pid: int) -> list[int]:
    """Return ``pid`` and every process below it (read from /proc)."""
    found = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += descendants(int(child))
    return found


def kill_machine(process: subprocess.Popen) -> None:
    """SIGKILL a machine's whole process tree at once: supervisor, worker, flow run (a machine that vanishes)."""
    for pid in descendants(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        for pid in reversed(descendants(process.pid)):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_machine(process)


@pytest.fixture(scope="module")
def database():
    """The Prefect server's database URL: a throwaway PostgreSQL cluster on loopback for this module.

    Without PostgreSQL the fleet tests skip with one line, or fail where ``HARMONIZE_REQUIRE_POSTGRES=1`` (CI).
    """
    require_postgres()
    with postgres_cluster() as url:
        yield url


@pytest.fixture(scope="module")
def server(tmp_path_factory, database):
    """A real ``prefect server start`` on loopback on PostgreSQL, the pool and deployments applied once; returns the
    clients' environment. The server's log is ``$PREFECT_HOME/server.log`` (``server_problems`` reads it)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_LOGGING_TO_API_ENABLED": "false"}
    env.pop("PREFECT_API_KEY", None)
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # only the server process talks to the database
    with open(home / "server.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port)], env={**env, "PREFECT_API_DATABASE_CONNECTION_URL": database},
                                   cwd=ROOT, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except OSError:
                log_tail = (home / "server.log").read_text(errors="replace")[-3000:]
                assert time.monotonic() < deadline and process.poll() is None, \
                    f"prefect server did not start on PostgreSQL\n{log_tail}"
                time.sleep(1)
        done = subprocess.run(harmonize("deploy", "--pool", POOL, "--zombie-seconds", str(ZOMBIE_SECONDS)),
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        assert f"shards: harmonize-shard/{POOL}" in done.stdout
        yield env
    finally:
        stop(process)


@pytest.fixture
def fleet(server, tmp_path):
    """Start fake-GPU machines on demand; returns (start(gpu) -> process, env, compute log path)."""
    log = tmp_path / "computed.jsonl"
    env = {**server, "HARMONIZE_COMPUTE_LOG": str(log)}
    machines: list[subprocess.Popen] = []

    def start(gpu: str) -> subprocess.Popen:
        machine = subprocess.Popen(harmonize("worker", "--pool", POOL, "--gpus", gpu, "--no-coordinator"),
                                   env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        machines.append(machine)
        return machine

    yield start, env, log
    for machine in machines:
        stop(machine)


def computed(log: Path) -> collections.Counter:
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return collections.Counter((e["stage"], e["item"]) for e in entries)


def api(env: dict[str, str], path: str, body: dict) -> object:
    """POST ``body`` to the Prefect REST API of ``env`` and return the decoded JSON answer."""
    request = urllib.request.Request(env["PREFECT_API_URL"] + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read() or b"null")


def api_get(env: dict[str, str], path: str) -> object:
    """GET ``path`` from the Prefect REST API of ``env`` and return the decoded JSON answer."""
    with urllib.request.urlopen(env["PREFECT_API_URL"] + path, timeout=30) as answer:
        return json.loads(answer.read())


def server_events(env: dict[str, str], since: float, kinds: dict[str, list[str]]) -> list[dict]:
    """Return the server's events since ``since`` (epoch s), oldest first, whose type matches ``kinds``
    (``{"prefix": [...]}`` or ``{"name": [...]}``), following the API's pages."""
    start = datetime.fromtimestamp(since, UTC).isoformat()
    page = api(env, "/events/filter", {"filter": {"occurred": {"since": start}, "event": kinds, "order": "ASC"},
                                       "limit": 50})
    events = list(page.get("events", []))
    while page.get("next_page") and len(events) < 1000:
        with urllib.request.urlopen(page["next_page"], timeout=30) as answer:
            page = json.loads(answer.read())
        events += page.get("events", [])
    return events


def fleet_story(env: dict[str, str], since: float) -> str:
    """Return what the server saw since ``since`` (epoch s): each flow run's state, then flow-run and automation events.

    A fleet test that fails prints this, so a red CI run says whether a heartbeat, the automation or a worker was
    missing.
    """
    lines = []
    try:
        runs = api(env, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC", "limit": 200})
        names = {run["id"]: run["name"] for run in runs}
        for run in runs:
            state = run.get("state") or {}
            lines.append(f"run {run['name']}: {state.get('name')} {state.get('message') or ''}")
        for event in server_events(env, since, {"prefix": ["prefect.flow-run.", "prefect.automation"]}):
            resource = event["resource"]["prefect.resource.id"]
            name = names.get(resource.removeprefix("prefect.flow-run."), resource)
            lines.append(f"{event['occurred'][11:19]} {event['event']} {name}")
    except Exception as error:  # best effort: the server may be what failed
        lines.append(f"(could not read the server: {error})")
    return "\n".join(lines)


def crashed_runs(env: dict[str, str], since: float) -> list[str]:
    """Return the names of the flow runs the server saw enter Crashed since ``since`` (epoch s)."""
    return sorted(event["resource"].get("prefect.resource.name", "")
                  for event in server_events(env, since, {"name": ["prefect.flow-run.Crashed"]}))


def server_log(env: dict[str, str]) -> Path:
    """Return the file the ``server`` fixture's Prefect server logs to."""
    return Path(env["PREFECT_HOME"]) / "server.log"


def server_log_mark(env: dict[str, str]) -> int:
    """Return how many bytes the server has logged so far (``server_problems`` reads from there)."""
    return server_log(env).stat().st_size


def server_problems(env: dict[str, str], mark: int) -> tuple[dict[str, int], str]:
    """Return the server's problems logged since ``mark`` (``fleet_server.server_log_problems``: database locks,
    state-validation errors, dead-lettered messages, ERROR records) and its first ERROR lines, for the failure
    message."""
    with open(server_log(env), "rb") as log:
        log.seek(mark)
        text = log.read().decode(errors="replace")
    return server_log_problems(text, Path(env["PREFECT_HOME"]) / "dlq"), "\n".join(server_log_errors(text))


def automation_firings(env: dict[str, str], since: float) -> list[str]:
    """Return the names of the flow runs the zombie automation fired on since ``since`` (epoch s), sorted, plus
    ``action failed: <reason>`` for each of its actions the server refused (e.g. crashing a run already over)."""
    events = server_events(env, since, {"name": ["prefect.automation.triggered", "prefect.automation.action.failed"]})
    ours = [e for e in events if e["resource"].get("prefect.resource.name") == AUTOMATION_NAME]
    fired = [e["payload"]["triggering_labels"]["prefect.resource.id"].removeprefix("prefect.flow-run.")
             for e in ours if e["event"] == "prefect.automation.triggered"]
    names = [api_get(env, f"/flow_runs/{run}")["name"] for run in fired]
    return sorted(names) + [f"action failed: {e['payload'].get('reason')}" for e in ours
                            if e["event"] == "prefect.automation.action.failed"]


def summary_of(stdout: str) -> list[dict[str, str]]:
    line = next(line for line in stdout.splitlines() if "summary: " in line and line.rstrip().endswith(".csv"))
    return read_summary(line.rsplit("summary: ", 1)[1].strip())


def test_two_gpu_workers_share_a_manifest_and_compute_each_stage_once(fleet, tmp_path):
    start, env, log = fleet
    ids = tuple(f"i{n}" for n in range(6))
    desk = tmp_path / "desk"  # the run is typed here, with relative paths; the workers run elsewhere (ROOT)
    manifest = make_dataset(desk / "data", ids=ids).relative_to(desk)
    began, mark = time.time(), server_log_mark(env)
    start("0")
    start("1")
    done = subprocess.run(harmonize("run", str(manifest), "--out", "out", "--pool", POOL, *RUN_FLAGS), env=env,
                          cwd=desk, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = summary_of(done.stdout)
    assert sorted(r["id"] for r in rows) == list(ids) and {r["status"] for r in rows} == {"completed"}
    assert {r["worker"] for r in rows} == {f"{HOST}-gpu0", f"{HOST}-gpu1"}  # both machines ran items
    assert computed(log) == {(stage, item): 1 for stage in STAGES for item in ids}
    assert sorted(p.name for p in (desk / "out").iterdir() if p.name in ids) == list(ids)  # outputs where typed
    assert "report: " in done.stdout
    assert "would wait forever" not in done.stderr  # harmonize deploy's automation is in place and current
    story = fleet_story(env, began)
    assert crashed_runs(env, began) == [] and automation_firings(env, began) == [], story  # no machine was lost
    problems, errors = server_problems(env, mark)
    assert problems == NO_SERVER_PROBLEMS, errors


def test_a_machine_killed_mid_item_loses_nothing(fleet, tmp_path):
    start, env, log = fleet
    ids = ("k0", "k1", "k2")
    desk = tmp_path / "desk"  # the run is typed here, with relative paths
    # pass 1 long enough (tens of evaluations) that the kill lands inside it, the rest short
    manifest = make_dataset(desk / "data", ids=ids, overrides={"size": "64", "pass1_iters": "40",
                                                                "pass2_iters": "5"}).relative_to(desk)
    began, mark = time.time(), server_log_mark(env)
    doomed = start("0")
    run = subprocess.Popen(harmonize("run", str(manifest), "--out", "out", "--pool", POOL, *RUN_FLAGS), env=env,
                           cwd=desk, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    victim = None
    records = desk / "out" / ".cache"
    while victim is None:  # machine A finished a dilate and committed its record: it is now in that item's pass 1
        assert time.monotonic() < deadline and run.poll() is None, "machine A never started an item"
        time.sleep(0.5)
        entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        dilated = next((e["item"] for e in entries if e["stage"] == "dilate"), None)
        # the journal line comes just before the cache record: a kill between the two rightly recomputes the dilate
        victim = dilated if dilated and any(records.glob("dilate-*")) else None
    kill_machine(doomed)
    start("1")
    try:  # the zombie automation needs ZOMBIE_SECONDS, then the lock's lease (90 s), then one item on the CPU
        stdout, stderr = run.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        run.kill()
        stdout, stderr = run.communicate()
        pytest.fail(f"the run did not end 480 s after machine A was killed ({victim} lost?)\n{stderr[-3000:]}\n"
                    f"{fleet_story(env, began)}")
    assert run.returncode == 0, stderr[-3000:]
    rows = {r["id"]: r for r in summary_of(stdout)}
    story = f"{stderr[-3000:]}\n{fleet_story(env, began)}"
    assert sorted(rows) == list(ids) and {r["status"] for r in rows.values()} == {"completed"}, story
    assert rows[victim]["worker"] == f"{HOST}-gpu1", story  # finished on the surviving machine ...
    assert "dilate" in rows[victim]["cached"].split(";"), story  # ... reusing what the lost machine had finished
    assert "resubmitting" in stderr, story
    # the automation fired on the lost shard's run alone and crashed it: not on the shards machine B finished, nor
    # the manifest run (silent for 180 s at a time); its every action was accepted (none hit a run already over)
    crashed = crashed_runs(env, began)
    assert [name.split("-try-")[1] for name in crashed] == ["1"] and automation_firings(env, began) == crashed, story
    lost = api(env, "/flow_runs/filter", {"flow_runs": {"name": {"any_": crashed}}})
    assert [[item["id"] for item in run["parameters"]["items"]] for run in lost] == [[victim]], story
    assert all(count == 1 for (stage, _), count in computed(log).items() if stage == "dilate")
    problems, errors = server_problems(env, mark)
    assert problems == NO_SERVER_PROBLEMS, errors


def test_two_concurrent_runs_compute_each_pass_once(tmp_path):
    manifest = make_dataset(tmp_path / "data", ids=("a", "b", "c"))
    log = tmp_path / "computed.jsonl"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HARMONIZE_COMPUTE_LOG": str(log)}
    env.pop("PREFECT_API_URL", None)
    command = harmonize("run", str(manifest), "--out", str(tmp_path / "out"), *RUN_FLAGS)
    runs = [subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    summaries = [summary_of(stdout) for stdout, _ in outputs]
    for item in ("a", "b", "c"):
        for stage in ("pass1", "pass2"):
            cached = [stage in {r["id"]: r for r in rows}[item]["cached"].split(";") for rows in summaries]
            assert sorted(cached) == [False, True], (item, stage, cached)  # computed by one run, a hit in the other
    assert computed(log) == {(stage, item): 1 for stage in STAGES for item in ("a", "b", "c")}


def test_the_zombie_automation_crashes_silent_shard_runs_and_nothing_else(server):
    """A shard run that never sent a heartbeat (its machine died first) ends Crashed; another flow's run does not.

    Both runs are put in Running by hand, with no process behind them: the shard run never sends a heartbeat, the
    other run sends one and then stays silent, as any flow run on the server does between its default 180 s
    heartbeats.
    """
    from prefect import flow, get_client
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed, Pending, Running

    @flow(name="someone-elses-flow")
    def someone_elses_flow() -> None:
        pass

    began, mark = time.time(), server_log_mark(server)
    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(f"harmonize-shard/{POOL}")
        shard = client.create_flow_run_from_deployment(deployment.id, state=Pending(), parameters={
            "items": [], "out": "unused", "backbone": {}, "run_id": "unused"})  # Pending: no worker takes it
        other = client.create_flow_run(someone_elses_flow, state=Pending())
        for run in (shard, other):
            client.set_flow_run_state(run.id, Running(), force=True)
        api(server, "/events", [{"id": str(uuid.uuid4()), "occurred": datetime.now(UTC).isoformat(),
                                 "event": "prefect.flow-run.heartbeat",
                                 "resource": {"prefect.resource.id": f"prefect.flow-run.{other.id}"}}])
        try:
            deadline = time.monotonic() + 2 * ZOMBIE_SECONDS + 60  # proactive checks run once a window
            while client.read_flow_run(shard.id).state.type != StateType.CRASHED:
                assert time.monotonic() < deadline, f"the silent shard run was never crashed\n{fleet_story(server, began)}"
                time.sleep(2)
            assert time.time() - began >= ZOMBIE_SECONDS  # not before its silence was long enough
            assert client.read_flow_run(other.id).state.type == StateType.RUNNING, fleet_story(server, began)
            deadline = time.monotonic() + 60  # the server stores events in batches, seconds after they happen
            while not (fired := automation_firings(server, began)) and time.monotonic() < deadline:
                time.sleep(2)
            assert fired == [shard.name], fleet_story(server, began)  # fired on the silent shard run alone
        finally:
            for run in (shard, other):
                client.set_flow_run_state(run.id, Completed(), force=True)
    problems, errors = server_problems(server, mark)
    assert problems == NO_SERVER_PROBLEMS, errors
