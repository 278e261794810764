"""HCCL (Ascend NPU) two-rank group. Imported only when the tensors live on an NPU.

vLLM's stateless helper reaches HCCL through the platform hook that vllm-ascend
provides; some releases lacked it (vllm-ascend #5700), so fall back to constructing
torch_npu's ProcessGroupHCCL on the same prefix store, as vllm-ascend's Netloader does.
Not exercised on this project's CPU test machines.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch_npu  # noqa: F401  (registers the npu device and HCCL backend)
from torch.distributed import PrefixStore, ProcessGroup


def hccl_group(
    host: str, port: int, rank: int, timeout: timedelta, listen_socket: socket.socket | None = None
) -> ProcessGroup:
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    try:
        return stateless_init_torch_distributed_process_group(
            host, port, rank, 2, "hccl", listen_socket=listen_socket, timeout=timeout
        )
    except (NotImplementedError, AttributeError, RuntimeError) as exc:
        if listen_socket is not None and listen_socket.fileno() < 0:
            raise  # the helper consumed the socket; cannot retry on it
        return _hccl_group_direct(host, port, rank, timeout, listen_socket, exc)


def _hccl_group_direct(host, port, rank, timeout, listen_socket, cause) -> ProcessGroup:
    import torch
    from torch_npu._C._distributed_c10d import ProcessGroupHCCL
    from vllm.distributed.utils import create_tcp_store, get_tcp_uri

    store = create_tcp_store(
        host, port, listen_socket=listen_socket, world_size=2, is_master=rank == 0, timeout=timeout
    )
    prefix_store = PrefixStore(get_tcp_uri(host, port), store)
    options = ProcessGroupHCCL.Options()
    options._timeout = timeout
    pg = ProcessGroup(prefix_store, rank, 2)
    backend = ProcessGroupHCCL(prefix_store, rank, 2, options)
    pg._set_default_backend(ProcessGroup.BackendType.CUSTOM)
    pg._register_backend(torch.device("npu"), ProcessGroup.BackendType.CUSTOM, backend)
    return pg
