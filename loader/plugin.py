"""vLLM general-plugin entry point: makes `--load-format netloader` available.

vLLM calls every `vllm.general_plugins` entry point in each of its processes (API
server, engine core, workers), so installing this package is all it takes.
"""

LOAD_FORMAT = "netloader"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from loader.model_loader import NetloaderModelLoader

    register_model_loader(LOAD_FORMAT)(NetloaderModelLoader)
    _registered = True
