"""HCCL group creation against a stand-in torch_npu (vllm-ascend HEAD: no platform hook
for vLLM's stateless helper), in a subprocess: the npu device name is process-global."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading, types
    from datetime import timedelta
    import torch
    from torch.distributed import HashStore
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    seen = []

    class Options:
        def __init__(self):
            self._timeout = None
            self.is_high_priority_stream = True
            self.global_ranks_in_group = None
            self.group_id = None

    class ProcessGroupHCCL(ProcessGroupGloo):
        # like HCCL, the constructor does not wait for the peer (communicators come up at
        # the first operation): a one-rank gloo backend on a local store stands in
        Options = Options

        def __init__(self, store, rank, size, options):
            seen.append({
                "timeout_s": options._timeout.total_seconds(),
                "high_priority": options.is_high_priority_stream,
                "group_id": options.group_id,
                "async_error_handling": os.environ.get("HCCL_ASYNC_ERROR_HANDLING"),
            })
            super().__init__(HashStore(), 0, 1, options._timeout)

    c10d = types.ModuleType("torch_npu._C._distributed_c10d")
    c10d.ProcessGroupHCCL = ProcessGroupHCCL
    sys.modules["torch_npu"] = types.ModuleType("torch_npu")
    sys.modules["torch_npu._C"] = types.ModuleType("torch_npu._C")
    sys.modules["torch_npu._C._distributed_c10d"] = c10d
    torch.utils.rename_privateuse1_backend("npu")

    import vllm.distributed.utils as vllm_utils
    def no_hook(*a, **k):
        raise NotImplementedError("vllm-ascend HEAD has no stateless_init_device_torch_dist_pg")
    vllm_utils.stateless_init_torch_distributed_process_group = no_hook

    from loader.transfer.process_group import bind_store_socket, create_transfer_group
    os.environ["HCCL_ASYNC_ERROR_HANDLING"] = "1"  # what a vLLM process runs with
    groups = []
    for session in ("aa" * 16, "bb" * 16):
        sock = bind_store_socket("127.0.0.1")
        port = sock.getsockname()[1]
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("src", create_transfer_group(
            "npu", "127.0.0.1", port, 0, session, 10, 42, listen_socket=sock)))
        t.start()
        groups.append(create_transfer_group("npu", "127.0.0.1", port, 1, session, 10, 42))
        t.join(30)
        groups.append(out["src"])
    print(json.dumps({"seen": seen, "env_after": os.environ["HCCL_ASYNC_ERROR_HANDLING"],
                      "groups": len(groups)}))
    """
)


def test_hccl_groups_are_built_directly_abort_only_with_a_group_id_per_session():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["groups"] == 4
    assert len(result["seen"]) == 4  # both ranks of two sessions, no vLLM hook involved
    for backend in result["seen"]:
        assert backend["timeout_s"] == 42  # the op timeout, not the setup one
        assert backend["high_priority"] is False
        assert backend["async_error_handling"] == "0"  # abort-only, never kill the process
    ids = {b["group_id"] for b in result["seen"]}
    assert ids == {"netloader/" + "aa" * 16, "netloader/" + "bb" * 16}
    assert result["env_after"] == "1"  # vLLM's own setting restored
