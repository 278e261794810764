"""The store probe that keeps the client out of torch's GIL-holding connect loop."""

import socket
import threading
import time

import pytest

from loader.transfer.process_group import wait_for_store


def test_returns_once_the_store_listens():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        assert wait_for_store("127.0.0.1", srv.getsockname()[1], timeout_s=5) is None
        srv.settimeout(1)
        conn, _ = srv.accept()  # the probe really connected (and closed its socket)
        with conn:
            assert conn.recv(1) == b""


def test_unreachable_store_times_out_and_other_threads_keep_running():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.05)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
            wait_for_store("127.0.0.1", port, timeout_s=0.6)
    finally:
        stop.set()
        thread.join()
    assert len(ticks) >= 3  # the probe released the GIL while it waited
