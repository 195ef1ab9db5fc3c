"""Devices in a fleet: one network stage per device at a time, OOM retried on a freed cache, sticky errors end the
process and retire the GPU's worker, workers pinned one per GPU."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from flows.fleet import workers
from tasks import gpu, stages, waits


def test_network_stages_take_turns_on_a_device():
    inside, worst, guard = [0], [0], threading.Lock()

    def stage(device: str) -> None:
        with gpu.exclusive_device(device):
            with guard:
                inside[0] += 1
                worst[0] = max(worst[0], inside[0])
            time.sleep(0.05)
            with guard:
                inside[0] -= 1

    threads = [threading.Thread(target=stage, args=("cuda:0",)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert worst[0] == 1
    assert gpu.device_lock("cuda:0") is gpu.device_lock("cuda:0") is not gpu.device_lock("cuda:1")



def test_a_wait_for_the_device_names_the_item_in_front_and_is_counted(monkeypatch):
    """A stage that waits for the device says so once the wait reaches NOTICE_SECONDS, naming the stage call that
    holds it; its StageWaits gets the seconds and the holder, and the first stage's gets none."""
    monkeypatch.setattr(waits, "NOTICE_SECONDS", 0.3)
    said: list[str] = []
    first = waits.StageWaits(who="item 1/2 a", stage="pass1", announce=said.append)
    second = waits.StageWaits(who="item 2/2 b", stage="pass1", announce=said.append)
    holding = threading.Event()

    def hold() -> None:
        with waits.waiting_in(first), gpu.exclusive_device("cuda:7"):
            holding.set()
            time.sleep(1.2)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait()
    with waits.waiting_in(second), gpu.exclusive_device("cuda:7"):
        pass
    thread.join()
    assert len(said) == 1 and said[0].startswith("item 2/2 b: pass1 waiting for the device (cuda:7) behind item 1/2 "
                                                 "a pass1 for ")
    assert first.waited() == 0 and 0.9 < second.device_s < 2 and second.lock_s == 0
    assert second.device_holder == "item 1/2 a pass1"
    assert second.describe() == ", after 1 s waiting for the device behind item 1/2 a pass1"


class _FailedState:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def result(self):
        raise self.exc


def test_out_of_memory_is_retried_after_freeing_the_cache(monkeypatch):
    freed = []
    monkeypatch.setattr(stages, "free_device_memory", lambda: freed.append(True))
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert stages.retry_on_transient(None, None, _FailedState(oom)) is True and freed == [True]
    from harmonize_core.errors import StageTimeoutError

    deadline = StageTimeoutError("pass1: stopped after 9 s at evaluation 3 of 1000 (limit 5 s; raise max_seconds)")
    assert stages.retry_on_transient(None, None, _FailedState(deadline)) is False and freed == [True]


@pytest.mark.parametrize(("error", "sticky"), [
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("CUDA error: unspecified launch failure"), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory"), False),
    (RuntimeError("CUDA error: out of memory"), False),
    (RuntimeError("shape mismatch"), False),
    (ValueError("illegal memory access"), False),
])
def test_sticky_cuda_errors_are_told_apart(error, sticky):
    assert gpu.is_sticky_cuda_error(error) is sticky


def test_a_sticky_error_ends_the_process_and_leaves_a_marker(tmp_path, monkeypatch):
    monkeypatch.setenv(gpu.STATE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(gpu.WORKER_NAME_ENV, "box-gpu3")
    codes = []
    gpu.stop_process(RuntimeError("CUDA error: an illegal memory access"), exit_fn=codes.append)
    assert codes == [gpu.STICKY_EXIT]
    assert "illegal memory access" in (tmp_path / f"box-gpu3.{gpu.STICKY_MARKER}").read_text()
    with pytest.raises(ValueError):  # anything else propagates untouched
        with gpu.guard_cuda():
            raise ValueError("not a CUDA problem")


def test_one_worker_per_gpu_pinned_and_a_sticky_gpu_retired(tmp_path, monkeypatch):
    planned = workers.plan_workers(["0", "3"], coordinator=True, state_dir=tmp_path)
    assert [(w.queue, w.env.get("CUDA_VISIBLE_DEVICES")) for w in planned] == [("gpu", "0"), ("gpu", "3"),
                                                                             ("coordinator", None)]
    assert planned[1].env[gpu.WORKER_NAME_ENV].endswith("-gpu3")
    assert planned[0].env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
    assert "--limit" in planned[0].command("pool") and planned[0].command("pool")[-1] == "1"
    assert workers.parse_gpus("0, 2") == ["0", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    assert workers.parse_gpus("auto") == ["5", "6"]

    class Alive:
        pid = -1

        def poll(self):
            return None

    sick = planned[1]
    sick.process, sick.starts = Alive(), [time.monotonic()]
    monkeypatch.setattr(sick, "stop", lambda: None)
    Path(tmp_path / f"{sick.name}.{gpu.STICKY_MARKER}").write_text("boom")
    workers.check(sick, "pool", tmp_path)
    assert sick.retired
