"""What the work-pool fan-out costs per item: seconds of orchestration against the item's own compute.

Starts a Prefect server on loopback (SQLite, a temporary PREFECT_HOME), applies ``harmonize deploy``, starts one
``harmonize worker`` per fake GPU id, and runs the same tiny procedural manifest twice into fresh outputs: once in
this process (``harmonize run``) and once fanned out (``harmonize run --pool``). For every shard run it reads from the
Prefect API when the run was created, started and ended, and compares with the compute its items report:

- queue wait: created -> started (a worker polling and starting the flow-run process);
- run overhead: started -> ended minus the items' own stage seconds (process start, imports, loading the network,
  task orchestration, writing rows);
- per item: (queue wait + run overhead) / items of the shard.

Usage (from the repository root; about 3-5 minutes on 2 CPU cores)::

    scripts/venv-run python bench/fleet_overhead.py [--items 6] [--workers 2] [--shard-size 1] [--size 48]
        [--iters 3] [--out /tmp/fleet-bench]

Prints a markdown table (also written to OUT/fleet_overhead.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
POOL = "fleet-bench"
STAGES = ("dilate", "pass1", "blend", "pass2", "reconstruct")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def harmonize(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def start_server(home: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_WORKER_QUERY_SECONDS": "2"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for _ in range(180):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            return server, env
        except OSError:
            time.sleep(1)
    raise SystemExit("prefect server did not start")


def summary_rows(stdout: str) -> list[dict[str, str]]:
    line = next(line for line in stdout.splitlines() if "summary: " in line and line.rstrip().endswith(".csv"))
    with open(line.rsplit("summary: ", 1)[1].strip(), newline="") as stream:
        return list(csv.DictReader(stream))


def timed_run(command: list[str], env: dict[str, str]) -> tuple[float, list[dict[str, str]]]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - started, summary_rows(done.stdout)


def shard_times(env: dict[str, str]) -> list[dict[str, Any]]:
    """Return, per shard run on the server, the seconds between its states: Scheduled -> Pending (a worker took
    it), Pending -> Running (the flow-run process started and imported everything), Running -> Completed."""
    os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "PREFECT_HOME")})
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    shards = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["harmonize-shard"])))
        for run in runs:
            at = {}
            for state in client.read_flow_run_states(run.id):
                at.setdefault(state.type.value, state.timestamp)
            if not {"SCHEDULED", "PENDING", "RUNNING", "COMPLETED"} <= set(at):
                continue
            shards.append({"queued": (at["PENDING"] - at["SCHEDULED"]).total_seconds(),
                           "start": (at["RUNNING"] - at["PENDING"]).total_seconds(),
                           "run": (at["COMPLETED"] - at["RUNNING"]).total_seconds(),
                           "ids": [i["id"] for i in run.parameters.get("items", [])]})
    return shards


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1)
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fleet-bench"))
    args = parser.parse_args()
    from manifests.demo import write_demo

    args.out.mkdir(parents=True, exist_ok=True)
    ids = tuple(f"b{n}" for n in range(args.items))
    cells = {"size": str(args.size), "pass1_iters": str(args.iters), "pass2_iters": str(args.iters)}
    manifest = write_demo(args.out / f"data-{time.time_ns()}", ids=ids, size=args.size, overrides=cells)
    flags = ["--backbone", "vgg16", "--weights", "random:0", "--device", "cpu"]
    load = [os.getloadavg()[0]]
    server, env = start_server(args.out / f"home-{time.time_ns()}")
    workers = []
    try:
        subprocess.run(harmonize("deploy", "--pool", POOL), env=env, cwd=ROOT, check=True, capture_output=True)
        workers = [subprocess.Popen(harmonize("worker", "--pool", POOL, "--gpus", str(gpu), "--no-coordinator"),
                                    env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL) for gpu in range(args.workers)]
        local_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        local_wall, local_rows = timed_run(harmonize("run", str(manifest), "--out", str(args.out / f"local-{time.time_ns()}"),
                                                     *flags), local_env)
        time.sleep(5)  # the workers have started and polled
        pool_wall, pool_rows = timed_run(harmonize("run", str(manifest), "--out", str(args.out / f"pool-{time.time_ns()}"),
                                                   "--pool", POOL, "--shard-size", str(args.shard_size), *flags), env)
        shards = shard_times(env)
    finally:
        for process in [*workers, server]:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    load.append(os.getloadavg()[0])
    compute = {r["id"]: float(r["total_s"]) for r in pool_rows}
    in_run = [s["run"] - sum(compute[i] for i in s["ids"]) for s in shards]
    per_item = [(s["start"] + extra) / max(1, len(s["ids"])) for s, extra in zip(shards, in_run, strict=True)]
    ideal = sum(compute.values()) / args.workers
    median = statistics.median
    rows = [
        ("items, workers, shard size", f"{args.items}, {args.workers}, {args.shard_size}"),
        ("item compute (median of the items' stage seconds)", f"{median(compute.values()):.2f} s"),
        ("local run wall (one process, 4 items in flight)", f"{local_wall:.1f} s"),
        ("pooled run wall (coordinator included)", f"{pool_wall:.1f} s"),
        ("pooled wall if orchestration were free (sum of compute / workers)", f"{ideal:.1f} s"),
        ("a worker takes a scheduled shard (Scheduled -> Pending), median / min", f"{median(s['queued'] for s in shards):.1f} / "
                                                                                f"{min(s['queued'] for s in shards):.1f} s"),
        ("flow-run process start and imports (Pending -> Running), median", f"{median(s['start'] for s in shards):.1f} s"),
        ("inside the run beyond the items' compute, median", f"{median(in_run):.1f} s"),
        ("orchestration per item (process start + in-run overhead), median / max",
         f"{median(per_item):.1f} / {max(per_item):.1f} s"),
        ("load average start -> end", f"{load[0]:.2f} -> {load[1]:.2f}"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    (args.out / "fleet_overhead.md").write_text(table + "\n" + json.dumps({"shards": shards}, default=str) + "\n")
    del local_rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
