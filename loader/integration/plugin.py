"""vLLM general-plugin entry point: makes `--load-format netloader` available.

vLLM calls every `vllm.general_plugins` entry point in each of its processes (API
server, engine core, workers), so installing this package is all it takes.
"""

import logging

log = logging.getLogger(__name__)

LOAD_FORMAT = "netloader"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from loader.integration.model_loader import NetloaderModelLoader
    from loader.integration.vllm_compat import register_loader

    register_loader(LOAD_FORMAT, NetloaderModelLoader)  # never raises; logs why it could not
    _route_logs_through_vllm()
    _watch_warm_up()
    _prefetch_model_infos()
    _registered = True


def _prefetch_model_infos() -> None:
    """Before the API server builds the model config (and vLLM inspects the model class),
    fetch the inspection results from a peer (loader.integration.model_info)."""
    from loader.integration.vllm_compat import SURFACE

    engine_args = SURFACE.found.get("EngineArgs")
    if engine_args is None or getattr(engine_args, "_netloader_prefetches", False):
        return
    inner = engine_args.create_model_config

    def create_model_config(self, *args, **kwargs):
        if getattr(self, "load_format", None) == LOAD_FORMAT:
            from loader.integration import model_info

            _route_logs_through_vllm()  # vLLM's handler may exist only now (API server)
            model_info.prefetch(self.model_loader_extra_config)
        return inner(self, *args, **kwargs)

    engine_args.create_model_config = create_model_config
    engine_args._netloader_prefetches = True


def _watch_warm_up() -> None:
    """Tell this process's weight servers when vLLM's warm-up is over. Every worker class
    (CPU, CUDA, Ascend) is driven through WorkerWrapperBase by method name, so one
    wrapper method there sees `compile_or_warm_up_model` finish."""
    try:
        from vllm.v1.worker.worker_base import WorkerWrapperBase
    except ImportError:
        log.info("netloader: vLLM warm-up not observable here")
        return
    if getattr(WorkerWrapperBase, "_netloader_watches_warm_up", False):
        return
    inner = WorkerWrapperBase.__dict__.get("compile_or_warm_up_model")

    def compile_or_warm_up_model(self, *args, **kwargs):
        from loader.integration.serving import warm_up

        try:
            if inner is not None:
                return inner(self, *args, **kwargs)
            return self.worker.compile_or_warm_up_model(*args, **kwargs)
        finally:
            warm_up.done()

    WorkerWrapperBase.compile_or_warm_up_model = compile_or_warm_up_model
    WorkerWrapperBase._netloader_watches_warm_up = True
    from loader.integration.serving import warm_up

    warm_up.watch()


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
