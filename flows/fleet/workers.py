"""``harmonize worker``: the Prefect workers of one machine, one per visible GPU, each pinned to its GPU.

For every GPU id it starts ``prefect worker start --pool POOL --work-queue gpu --limit 1 --type process`` with
``CUDA_VISIBLE_DEVICES=<id>``: N GPUs run N shards at once and never share a device (inside a shard, items take
turns on the device: ``tasks.gpu``). Unless ``--no-coordinator``, one more worker serves the pool's
``coordinator`` queue (the nightly manifest runs, which only wait and collect). Each worker gets a name
(``<host>-gpu<id>``) that its rows carry in the summary's ``worker`` column, and the heartbeat setting the zombie
automation relies on.

A command that would start no shard worker is refused with one line (exit 2): no GPU visible (``--gpus auto`` found
none) would otherwise leave only the coordinator running while shards wait forever. ``--cpu N`` starts N workers
that run shards on the CPU instead (``<host>-cpu<i>``, no GPU visible to them); ``--coordinator-only`` serves just
the coordinator queue, on purpose.

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

from harmonize_core.errors import InputError
from tasks.gpu import STATE_DIR_ENV, STICKY_MARKER, WORKER_NAME_ENV

from .deploy import heartbeat_env, require_api
from .settings import COORDINATOR_QUEUE, SHARD_QUEUE

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


def cuda_device_count() -> int:
    """Return how many CUDA devices torch sees from this process (0 on a machine without a usable GPU)."""
    import torch

    return torch.cuda.device_count()


def worker_gpus(text: str | None, cpu: int | None = None, coordinator_only: bool = False) -> list[str]:
    """Return the GPU ids to start shard workers for: ``--gpus`` parsed, none with ``--cpu N`` or
    ``--coordinator-only``. Raises ``InputError`` (one line) when the command would start no shard worker, or
    combines flags that contradict each other."""
    explicit = text not in (None, "", "auto")
    if sum((explicit, cpu is not None, coordinator_only)) > 1:
        raise InputError("worker: give one of --gpus, --cpu and --coordinator-only")
    if coordinator_only:
        return []
    if cpu is not None:
        if cpu < 1:
            raise InputError(f"worker: --cpu {cpu}: give the number of CPU shard workers to start, 1 or more")
        return []
    gpus = parse_gpus(text)
    if not gpus:
        where = ("CUDA_VISIBLE_DEVICES is empty" if os.environ.get("CUDA_VISIBLE_DEVICES") is not None
                 else "torch sees no CUDA device")
        asked = f"--gpus {text!r} names no GPU" if explicit else f"no GPU visible on this machine ({where})"
        raise InputError(f"worker: {asked}, so no worker would take shards and runs would wait for ever: run it on "
                         "a GPU machine, name the GPUs with --gpus 0,1, run shards on the CPU with --cpu N, or "
                         "serve only the coordinator queue with --coordinator-only")
    return gpus


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


def plan_workers(gpus: list[str], coordinator: bool, state_dir: Path, cpu: int = 0) -> list[WorkerProcess]:
    """Return the workers to run: one per GPU id (pinned), ``cpu`` CPU workers (no GPU visible to them), plus the
    coordinator worker when asked."""
    host = socket.gethostname()
    base = {**heartbeat_env(), STATE_DIR_ENV: str(state_dir)}
    slots = [(f"gpu{gpu}", gpu) for gpu in gpus] + [(f"cpu{index}", "") for index in range(cpu)]
    workers = [WorkerProcess(f"{host}-{slot}", SHARD_QUEUE,
                             {**base, "CUDA_VISIBLE_DEVICES": visible, WORKER_NAME_ENV: f"{host}-{slot}"})
               for slot, visible in slots]
    if coordinator:
        workers.append(WorkerProcess(f"{host}-coordinator", COORDINATOR_QUEUE,
                                     {**base, WORKER_NAME_ENV: f"{host}-coordinator"}))
    return workers


def sticky(worker: WorkerProcess, state_dir: Path) -> bool:
    """Return True when ``worker``'s GPU reported a sticky CUDA error (its marker file exists)."""
    return (state_dir / f"{worker.name}.{STICKY_MARKER}").exists()


def supervise(pool: str, gpus: list[str], coordinator: bool = True, state_dir: Path | None = None,
              cpu: int = 0) -> int:
    """Run the workers until interrupted (restarting crashed ones, retiring sticky GPUs); return an exit code.

    Raises ``InputError`` when there would be no worker at all (no GPU, no ``cpu`` worker, no coordinator).
    """
    require_api()
    if not gpus and not cpu and not coordinator:
        raise InputError("worker: nothing to start: no GPU, no --cpu workers and --no-coordinator")
    if gpus and cuda_device_count() == 0:
        print(f"harmonize worker: warning: torch sees no CUDA device on this machine: the workers of --gpus "
              f"{','.join(gpus)} will run their shards on the CPU (--cpu N says so explicitly)", file=sys.stderr,
              flush=True)
    state_dir = state_dir or Path(tempfile.mkdtemp(prefix="harmonize-worker-"))
    workers = plan_workers(gpus, coordinator, state_dir, cpu=cpu)
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
