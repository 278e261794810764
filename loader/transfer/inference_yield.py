"""Keep a serving thread out of inference's way: least CPU priority, and off the cores the
model runners are pinned to.

Linux priorities and CPU affinities are per thread, and the threads a thread starts
(Gloo's I/O loops, c10d's store) inherit both, so a session thread calls
`yield_to_inference(cpus)` before it builds its process group, with the `serving_cpus()`
its server found when it started.

vLLM's CPU backend pins each worker process (its OpenMP threads, and with them every
thread the process starts later) to the cores of its rank and leaves a few cores
unpinned for the API server and the engine core. A serving thread on the model's own
core delays every decode step, priority or not: nice 19 still takes its slices there,
and the kernel's socket work for the transfer runs in its context. So a thread that
serves moves to the cores no worker of this instance is pinned to. Where nothing is
pinned (GPU and NPU workers, or `VLLM_CPU_OMP_THREADS_BIND=nobind`) nothing moves.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

SERVING_NICE = 19


def serving_cpus() -> set[int]:
    """The CPUs serving threads of this process should move to (empty: stay where they
    are). A scan of /proc: a server runs it once, at start and at normal priority (a
    session thread that scanned after lowering its own priority waited up to 0.9 s for
    it on a busy host, before every transfer)."""
    try:
        return spare_cpus(os.getpid(), os.getppid())
    except (AttributeError, OSError):
        return set()


def yield_to_inference(cpus: set[int] | None = None) -> None:
    """Nice 19 for the calling thread, and `cpus` (default: `serving_cpus()`) if not
    empty. Best effort: a platform without either keeps the thread as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SERVING_NICE)
    except (AttributeError, OSError):
        pass
    spare = serving_cpus() if cpus is None else cpus
    if not spare:
        return
    try:
        os.sched_setaffinity(0, spare)  # 0: the calling thread only
        logger.debug("netloader serving thread on CPUs %s (the model's are pinned elsewhere)",
                     sorted(spare))
    except (AttributeError, OSError):
        pass


def spare_cpus(pid: int, parent: int) -> set[int]:
    """The CPUs the instance may use (its parent process's) that neither worker `pid` nor
    any sibling worker is pinned to; empty when no worker is pinned to a strict subset."""
    available = os.sched_getaffinity(parent)
    pinned: set[int] = set()
    for process in {pid, *child_processes(parent)}:
        try:
            cpus = os.sched_getaffinity(process)
        except OSError:  # gone meanwhile
            continue
        if cpus < available:
            pinned |= cpus
    return available - pinned if pinned else set()


def child_processes(parent: int, proc: str = "/proc") -> list[int]:
    """The processes whose parent is `parent` (a scan of /proc: run once per session)."""
    children = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            children.append(int(name))
    return children
