"""The storage-backed lease locks: exclusive, renewed while held, taken over once a holder goes silent; local and S3."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.locks import StorageLockManager

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
