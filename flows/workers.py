"""``harmonize worker``: the Prefect workers of one machine, one per visible GPU, each pinned to its GPU.

For every GPU id it starts ``prefect worker start --pool POOL --work-queue gpu --limit 1 --type process`` with
``CUDA_VISIBLE_DEVICES=<id>``: N GPUs run N shards at once and never share a device (inside a shard, items take
turns on the device: ``tasks.gpu``). Unless ``--no-coordinator``, one more worker serves the pool's
``coordinator`` queue (the nightly manifest runs, which only wait and collect). Each worker gets a name
(``<host>-gpu<id>``) that its rows carry in the summary's ``worker`` column, and the heartbeat setting the zombie
automation relies on.

The supervisor restarts a worker that exits unexpectedly (after ``RESTART_DELAY_SECONDS``), except one whose GPU
had a sticky CUDA error (its flow-run process leaves a marker in the state folder, see ``tasks.gpu``): that GPU is
retired until someone checks it. Ctrl-C or SIGTERM stops every worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.gpu import STATE_DIR_ENV, STICKY_MARKER, WORKER_NAME_ENV

from .deploy import COORDINATOR_QUEUE, SHARD_QUEUE, heartbeat_env, require_api

RESTART_DELAY_SECONDS = 10.0
POLL_SECONDS = 1.0
STOP_GRACE_SECONDS = 20.0


def visible_gpus() -> list[str]:
    """Return the GPU ids this machine offers: ``$CUDA_VISIBLE_DEVICES`` if set, else one per CUDA device."""
    configured = os.environ.get("CUDA_VISIBLE_DEVICES")
    if configured is not None:
        return [gpu.strip() for gpu in configured.split(",") if gpu.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def parse_gpus(text: str | None) -> list[str]:
    """Return the GPU ids of ``--gpus`` (``0,1,3``), or every visible GPU for None/``auto``."""
    if text in (None, "", "auto"):
        return visible_gpus()
    return [gpu.strip() for gpu in text.split(",") if gpu.strip()]


@dataclass
class WorkerProcess:
    """One supervised ``prefect worker`` process."""

    name: str
    queue: str
    env: dict[str, str]
    process: subprocess.Popen | None = None
    retired: bool = False
    starts: list[float] = field(default_factory=list)

    def command(self, pool: str) -> list[str]:
        """Return the ``prefect worker start`` command line of this worker."""
        return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--work-queue", self.queue,
                "--type", "process", "--name", self.name, "--limit", "1"]

    def start(self, pool: str) -> None:
        """Start (or restart) the worker process in its own session (so a stop reaches its children too)."""
        self.process = subprocess.Popen(self.command(pool), env={**os.environ, **self.env}, start_new_session=True)
        self.starts.append(time.monotonic())
        print(f"harmonize worker: started {self.name} (queue {self.queue}, pid {self.process.pid})", flush=True)

    def stop(self) -> None:
        """Ask the worker's process group to stop, then kill it after a grace period."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def plan_workers(gpus: list[str], coordinator: bool, state_dir: Path) -> list[WorkerProcess]:
    """Return the workers to run: one per GPU id (pinned), plus the coordinator worker when asked."""
    host = socket.gethostname()
    base = {**heartbeat_env(), STATE_DIR_ENV: str(state_dir)}
    workers = [WorkerProcess(f"{host}-gpu{gpu}", SHARD_QUEUE,
                             {**base, "CUDA_VISIBLE_DEVICES": gpu, WORKER_NAME_ENV: f"{host}-gpu{gpu}"})
               for gpu in gpus]
    if coordinator:
        workers.append(WorkerProcess(f"{host}-coordinator", COORDINATOR_QUEUE,
                                     {**base, WORKER_NAME_ENV: f"{host}-coordinator"}))
    return workers


def sticky(worker: WorkerProcess, state_dir: Path) -> bool:
    """Return True when ``worker``'s GPU reported a sticky CUDA error (its marker file exists)."""
    return (state_dir / f"{worker.name}.{STICKY_MARKER}").exists()


def supervise(pool: str, gpus: list[str], coordinator: bool = True, state_dir: Path | None = None) -> int:
    """Run the workers until interrupted (restarting crashed ones, retiring sticky GPUs); return an exit code."""
    require_api()
    if not gpus and not coordinator:
        print("harmonize worker: no GPU visible here (pass --gpus or --coordinator)", file=sys.stderr)
        return 2
    state_dir = state_dir or Path(tempfile.mkdtemp(prefix="harmonize-worker-"))
    workers = plan_workers(gpus, coordinator, state_dir)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    for worker in workers:
        worker.start(pool)
    try:
        while not stopping and any(not w.retired for w in workers):
            time.sleep(POLL_SECONDS)
            for worker in workers:
                check(worker, pool, state_dir)
    except KeyboardInterrupt:
        pass
    finally:
        for worker in workers:
            worker.stop()
    return 0


def check(worker: WorkerProcess, pool: str, state_dir: Path) -> None:
    """Retire a worker whose GPU went bad; restart one that exited, after a short delay."""
    if worker.retired or worker.process is None:
        return
    if sticky(worker, state_dir):
        worker.stop()
        worker.retired = True
        print(f"harmonize worker: {worker.name} retired after a sticky CUDA error; check the GPU, then restart "
              "`harmonize worker`", file=sys.stderr, flush=True)
        return
    code = worker.process.poll()
    if code is not None and time.monotonic() - worker.starts[-1] > RESTART_DELAY_SECONDS:
        print(f"harmonize worker: {worker.name} exited with code {code}; restarting", file=sys.stderr, flush=True)
        worker.start(pool)
