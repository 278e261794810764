"""vLLM general-plugin entry point: makes `--load-format netloader` available.

vLLM calls every `vllm.general_plugins` entry point in each of its processes (API
server, engine core, workers), so installing this package is all it takes.
"""

import logging

LOAD_FORMAT = "netloader"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from loader.model_loader import NetloaderModelLoader
    from loader.vllm_compat import register_loader

    register_loader(LOAD_FORMAT, NetloaderModelLoader)  # never raises; logs why it could not
    _route_logs_through_vllm()
    _registered = True


def _route_logs_through_vllm() -> None:
    """Our `loader.*`/`mesh.*` records go out through vLLM's handler, in vLLM's format."""
    vllm_logger = logging.getLogger("vllm")
    for name in ("loader", "mesh"):
        ours = logging.getLogger(name)
        if ours.handlers or not vllm_logger.handlers:
            continue
        for handler in vllm_logger.handlers:
            ours.addHandler(handler)
        ours.setLevel(vllm_logger.level or logging.INFO)
        ours.propagate = False
