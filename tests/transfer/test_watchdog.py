import threading

import pytest

from loader.transfer.watchdog import PhaseTimeout, Watchdog


def test_result_and_exceptions_pass_through():
    assert Watchdog().run(lambda w: 42) == 42

    def fail(w):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        Watchdog().run(fail)


def test_a_phase_that_outlives_its_timeout_is_abandoned_after_on_timeout():
    released = threading.Event()
    aborted = []

    def hang(w):
        w.phase("bucket 3/9", 0.2)
        released.wait(30)  # stands in for a receive that never completes

    def abort():
        aborted.append(True)
        released.set()

    with pytest.raises(PhaseTimeout, match="bucket 3/9 timed out after 0.2s"):
        Watchdog().run(hang, on_timeout=abort)
    assert aborted == [True]


def test_each_phase_gets_a_fresh_deadline():
    now = [0.0]
    w = Watchdog(clock=lambda: now[0])
    w.phase("setup", 5)
    now[0] = 4.0
    assert w.expired() is None
    w.phase("bucket 0", 5)
    now[0] = 8.0
    assert w.expired() is None
    now[0] = 9.5
    assert w.expired() == ("bucket 0", 5)


def test_an_abandoned_worker_is_stopped_at_its_next_check():
    released = threading.Event()
    after_release = []

    def hang(w):
        w.phase("recv", 0.1)
        released.wait(30)  # a backend call that returns late
        try:
            w.check()
            after_release.append("continued")
        except PhaseTimeout:
            after_release.append("stopped")

    with pytest.raises(PhaseTimeout):
        Watchdog().run(hang, on_timeout=released.set)
    assert after_release == ["stopped"]
