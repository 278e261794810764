"""A serving thread yields to inference: nice 19, and off the cores the workers are pinned to."""

import os
import subprocess
import sys
import textwrap

import pytest

from loader.transfer import inference_yield
from loader.transfer.inference_yield import child_processes, spare_cpus


def write_stat(proc, pid: int, comm: str, ppid: int) -> None:
    (proc / str(pid)).mkdir()
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1\n")


def test_children_are_found_by_the_parent_field_whatever_the_command_name(tmp_path):
    write_stat(tmp_path, 10, "VLLM::Worker", 7)
    write_stat(tmp_path, 11, "odd ) 7 name (", 8)  # a name that mimics the format
    write_stat(tmp_path, 12, "python", 7)
    (tmp_path / "self").mkdir()
    (tmp_path / "13").mkdir()  # exited between listdir and open: no stat
    assert sorted(child_processes(7, str(tmp_path))) == [10, 12]


def fake_affinities(monkeypatch, parent_cpus, workers: dict[int, set[int]]):
    masks = {1: parent_cpus, **workers}
    monkeypatch.setattr(inference_yield.os, "sched_getaffinity", lambda pid: masks[pid])
    monkeypatch.setattr(inference_yield, "child_processes", lambda parent: list(workers))


def test_the_spare_cpus_exclude_every_pinned_worker_of_the_instance(monkeypatch):
    # tensor parallel 2 on CPU: each rank pinned to its cores, two cores left unpinned
    fake_affinities(monkeypatch, {0, 1, 2, 3, 4, 5}, {100: {0, 1}, 101: {2, 3}, 102: {0, 1, 2, 3, 4, 5}})
    assert spare_cpus(100, 1) == {4, 5}
    assert spare_cpus(101, 1) == {4, 5}


def test_nothing_moves_where_no_worker_is_pinned(monkeypatch):
    fake_affinities(monkeypatch, {0, 1, 2, 3}, {100: {0, 1, 2, 3}, 101: {0, 1, 2, 3}})
    assert spare_cpus(100, 1) == set()


def test_nothing_moves_where_the_workers_are_pinned_to_every_core(monkeypatch):
    fake_affinities(monkeypatch, {0, 1, 2, 3}, {100: {0, 1}, 101: {2, 3}})
    assert spare_cpus(100, 1) == set()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_serving_thread_of_a_pinned_worker_and_the_threads_it_starts_leave_its_cores():
    mine = sorted(os.sched_getaffinity(0))
    script = textwrap.dedent(f"""
        import os, threading
        os.sched_setaffinity(0, {{{mine[0]}}})  # as vLLM's OpenMP binding pins a worker
        from loader.transfer.inference_yield import yield_to_inference
        seen = {{}}
        def started_by_the_session():
            seen["child"] = sorted(os.sched_getaffinity(0))
        def session():
            yield_to_inference()
            seen["session"] = sorted(os.sched_getaffinity(0))
            seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            t = threading.Thread(target=started_by_the_session); t.start(); t.join()
        t = threading.Thread(target=session); t.start(); t.join()
        print(seen["session"], seen["child"], seen["nice"], sorted(os.sched_getaffinity(0)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    spare = mine[1:]
    assert out.stdout.strip() == f"{spare} {spare} 19 {[mine[0]]}"


def test_a_serving_thread_given_its_cpus_does_not_scan_proc_again(monkeypatch):
    import threading

    from loader.transfer import inference_yield

    def scan(*_):
        raise AssertionError("scanned /proc in the session thread")

    monkeypatch.setattr(inference_yield, "spare_cpus", scan)
    target = {sorted(os.sched_getaffinity(0))[-1]}
    seen = {}

    def session():
        inference_yield.yield_to_inference(target)
        seen["cpus"] = os.sched_getaffinity(0)

    t = threading.Thread(target=session)
    t.start()
    t.join()
    assert seen["cpus"] == target
