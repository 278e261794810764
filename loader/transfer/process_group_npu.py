"""HCCL (Ascend NPU) backend for a transfer group. Imported only when the tensors live on
an NPU. Built directly on torch_npu's ProcessGroupHCCL, as vllm-ascend's Netloader does:
current vllm-ascend no longer provides the platform hook vLLM's stateless helper needs.
Not exercised on this project's CPU test machines.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch_npu  # noqa: F401  (registers the npu device and HCCL backend)
from torch.distributed import PrefixStore, ProcessGroup


def hccl_group(
    prefix_store: PrefixStore, rank: int, timeout: timedelta, session_id: str
) -> ProcessGroup:
    from torch_npu._C._distributed_c10d import ProcessGroupHCCL

    options = ProcessGroupHCCL.Options()
    options._timeout = timeout
    options.is_high_priority_stream = False
    options.global_ranks_in_group = []
    options.group_id = f"netloader/{session_id}"  # unique per transfer
    pg = ProcessGroup(prefix_store, rank, 2)
    backend = ProcessGroupHCCL(prefix_store, rank, 2, options)
    backend._set_sequence_number_for_group()
    pg._set_default_backend(ProcessGroup.BackendType.CUSTOM)
    pg._register_backend(torch.device("npu"), ProcessGroup.BackendType.CUSTOM, backend)
    return pg
