"""The storage-backed lease locks: exclusive, renewed while held, taken over once a holder goes silent; local and S3."""

from __future__ import annotations

import re
import threading
import time

import pytest

from tasks import waits
from tasks.storage.locks import Lease, StorageLockManager, describe_holder

LEASE = 1.0  # seconds: short leases keep these tests fast


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3")
    return "s3://results/locks-test"


def _silence(manager: StorageLockManager) -> None:
    """Make a manager behave like a killed process: it stops renewing its leases."""
    manager._stop.set()


def test_a_lock_is_exclusive_until_released(out):
    first, second = StorageLockManager(out, lease=30), StorageLockManager(out, lease=30)
    assert first.acquire_lock("k", "a")
    assert first.is_lock_holder("k", "a") and first.is_locked("k") and second.is_locked("k")
    assert not second.acquire_lock("k", "b", acquire_timeout=0.3)
    assert not second.wait_for_lock("k", timeout=0.2)
    assert second.acquire_lock("other", "b")  # keys are independent
    first.release_lock("k", "a")
    assert not first.is_locked("k") and second.wait_for_lock("k", timeout=0.1)
    assert second.acquire_lock("k", "b", acquire_timeout=1)
    assert second.held() == ["k", "other"]


def test_a_waiter_gets_the_lock_as_soon_as_it_is_released(out):
    first, second = StorageLockManager(out, lease=30), StorageLockManager(out, lease=30)
    assert first.acquire_lock("k", "a")
    timer = threading.Timer(0.5, first.release_lock, args=("k", "a"))
    timer.start()
    started = time.monotonic()
    assert second.acquire_lock("k", "b", acquire_timeout=10)
    assert 0.4 < time.monotonic() - started < 3


def test_a_live_holder_keeps_its_lease_by_renewing_it(out):
    holder, waiter = StorageLockManager(out, lease=LEASE), StorageLockManager(out, lease=LEASE)
    assert holder.acquire_lock("k", "a")
    time.sleep(2.5 * LEASE)  # well past one lease: the renewer keeps it fresh
    assert not waiter.acquire_lock("k", "b", acquire_timeout=0.3)


def test_a_silent_holders_lease_lapses_and_is_taken_over(out):
    dead, waiter = StorageLockManager(out, lease=LEASE), StorageLockManager(out, lease=LEASE)
    assert dead.acquire_lock("k", "a")
    _silence(dead)
    started = time.monotonic()
    assert waiter.acquire_lock("k", "b", acquire_timeout=10)
    assert time.monotonic() - started >= 0.5 * LEASE
    assert waiter.is_lock_holder("k", "b")
    dead.release_lock("k", "a")  # the late release of the dead holder must not free the new holder's lock
    assert waiter.is_locked("k")


def test_many_contenders_never_hold_one_key_together(out):
    managers = [StorageLockManager(out, lease=30) for _ in range(6)]
    inside, worst, lock = [0], [0], threading.Lock()

    def contend(index: int) -> None:
        manager = managers[index]
        for _ in range(3):
            assert manager.acquire_lock("k", f"h{index}", acquire_timeout=30)
            with lock:
                inside[0] += 1
                worst[0] = max(worst[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1
            manager.release_lock("k", f"h{index}")

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(managers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert worst[0] == 1



def test_a_wait_for_a_dead_runs_lock_names_its_run_and_when_its_lease_lapses(out, monkeypatch):
    """The lock records the run, item and stage that took it; a stage waiting for it says whose it is, for how
    long it has been held and when its lease lapses, then that it took it over; its StageWaits gets the seconds."""
    import os
    import socket

    monkeypatch.setattr(waits, "NOTICE_SECONDS", 0.5)
    lease = 2.0
    dead, waiter = StorageLockManager(out, lease=lease), StorageLockManager(out, lease=lease)
    with waits.waiting_in(waits.StageWaits(who="item 1/4 a", stage="dilate", run_id="killed-run")):
        assert dead.acquire_lock("dilate-k", "x")
    _silence(dead)
    said: list[str] = []
    scope = waits.StageWaits(who="item 3/4 a", stage="dilate", run_id="rerun", announce=said.append)
    with waits.waiting_in(scope):
        assert waiter.acquire_lock("dilate-k", "y", acquire_timeout=10)
    whose = f"run killed-run (item 1/4 a dilate, pid {os.getpid()} on {socket.gethostname()})"
    assert len(said) == 2, said
    waiting = re.fullmatch(rf"item 3/4 a: dilate waiting for its stage lock, held by {re.escape(whose)} for (\d+) s: "
                           r"last renewed (\d+) s ago, so it lapses in (\d+) s unless renewed \(lease 2 s\)", said[0])
    assert waiting, said[0]
    held, age, lapses = (int(g) for g in waiting.groups())
    # announced after 0.5 s; S3 reads ages in whole seconds (up to 1 s off), and lapses 1 s later (resolution)
    assert held in (0, 1) and age in (0, 1, 2) and lapses in (1, 2, 3)
    assert re.fullmatch(rf"item 3/4 a: dilate took over its stage lock from {re.escape(whose)}, silent for [2-4] s "
                        r"\(lease 2 s\)", said[1]), said[1]
    assert 1.9 < scope.lock_s < 5 and scope.lock_holder == whose and scope.device_s == 0
    lock = waiter._backend.read("dilate-k")
    assert (lock.info["run"], lock.info["who"], lock.info["stage"]) == ("rerun", "item 3/4 a", "dilate")


def test_a_lock_taken_by_this_run_says_so_and_a_bare_one_names_its_process(out):
    manager = StorageLockManager(out, lease=30)
    with waits.waiting_in(waits.StageWaits(who="item 1/2 a", stage="pass1", run_id="r1")):
        assert manager.acquire_lock("pass1-k", "x")
        lease = manager._backend.read("pass1-k")
        assert describe_holder(lease).startswith("this run (item 1/2 a pass1, pid ")
    assert describe_holder(lease).startswith("run r1 (item 1/2 a pass1, pid ")
    bare = Lease("h", "t", 0.0, b'{"holder": "h", "pid": 12, "host": "gpu-7"}')
    assert describe_holder(bare) == "pid 12 on gpu-7"
    assert describe_holder(Lease("h", "t", 0.0, b"not json")) == "an unknown holder"
