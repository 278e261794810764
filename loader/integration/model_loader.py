"""The `netloader` load format: weights from a running peer, disk as the last resort.

Per worker rank: build the empty model, compute the fingerprint, try the sources
(mesh candidates, then the static SOURCE list), fall back to vLLM's DefaultModelLoader,
log one `netloader result:` line, then serve this rank's weights to the next instance
(when the config asks for serving: see loader.integration.serving).
"""

from __future__ import annotations

import copy
import gc
import logging
import time

import torch
from torch import nn

from loader.config import NetloaderConfig, parse_extra_config
from loader.distribution.discovery import MeshPresence
from loader.distribution.peer_record import RankIdentity
from loader.distribution.reattach import ReattachPolicy
from loader.distribution.sources import SourcePlan, plan_sources
from loader.distribution.upstream_choice import fetch_with_reattach
from loader.integration import compile_cache, serving, vllm_compat
from loader.integration.identity import rank_identity
from loader.integration.process_exit import on_process_exit
from loader.integration.reshard_stage import rank_layout, reshard_after
from loader.integration.result import LoadResult, log_result
from loader.integration.vllm_compat import (  # every vLLM API goes through the adapter
    BaseModelLoader,
    DefaultModelLoader,
    LoadConfig,
    ModelConfig,
    VllmConfig,
    finalize_layerwise_processing,
    has_online_quant,
    process_weights_after_loading,
    set_default_torch_dtype,
)
from loader.transfer.checksum import algorithm_for_device, warm_up_in_background
from loader.transfer.client import FetchOutcome, FetchRequest, describe_failures

log = logging.getLogger(__name__)


class NetloaderModelLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig):
        vllm_compat.require()  # a vLLM without what the loader needs stops here, named
        super().__init__(load_config)
        # Bad keys fail here, at engine start, with an error naming the key.
        self.config: NetloaderConfig = parse_extra_config(load_config.model_loader_extra_config)
        self._disk = DefaultModelLoader(_disk_load_config(load_config))

    def download_model(self, model_config: ModelConfig) -> None:
        self._disk.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """Standalone in-place (re)load, as vLLM's weight reload uses it: from disk."""
        self._disk.load_weights(model, model_config)

    def load_model(
        self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = ""
    ) -> nn.Module:
        load_device = vllm_config.device_config.device
        if vllm_config.load_config.device is not None:
            load_device = vllm_config.load_config.device
        target_device = torch.device(load_device)
        started = time.monotonic()
        identity = rank_identity(vllm_config, model_config, self.config)
        fingerprinted = time.monotonic()
        presence = self._join_mesh(identity, model_config)  # joins while the model is built
        warm_up_in_background(algorithm_for_device(target_device.type))  # so does the hash
        with set_default_torch_dtype(model_config.dtype):
            with target_device:
                model = self.create_model(vllm_config, model_config, prefix)
            initialized = time.monotonic()
            layout = rank_layout(model, servable_tensors(model), identity)  # for other shapes
            result, server = self._fill_weights(
                model, model_config, identity, presence, started, layout
            )
            result.phases["fingerprint"] = fingerprinted - started
            result.phases["init"] = initialized - fingerprinted
            fetching = time.monotonic()
            compiled = self._compile_cache(vllm_config, identity, presence, result)
            result.phases["compile_cache"] = time.monotonic() - fetching

            collecting = time.monotonic()
            gc.collect()
            torch.accelerator.empty_cache()
            result.phases["gc"] = time.monotonic() - collecting
            if has_online_quant(model):
                finalize_layerwise_processing(model, model_config)
            # Kernel post-processing may repack and drop parameters (oneDNN on CPU):
            # keep references to the raw tensors so they can be served afterwards.
            raw_tensors = servable_tensors(model)
            processing = time.monotonic()
            process_weights_after_loading(model, model_config, target_device)
            result.phases["process_weights"] = time.monotonic() - processing
            served, result.retained_bytes = serving.served_tensors(raw_tensors, model)
            result.seconds = time.monotonic() - started
            log_result(result)
            gc.collect()
            torch.accelerator.empty_cache()

        serving.warm_up.begin()  # no new clients until vLLM's warm-up is over
        if server is not None and not _same_storage(server.tensors, served):
            # the disk load replaced parameters, or copies moved to host memory
            serving.stop_server(server)
            server = None
        if server is None:
            server = serving.start_serving(served, identity, self.config, target_device, layout)
        if server is not None:
            server.retained_bytes = result.retained_bytes
        if presence is not None and server is not None:
            presence.announce(server)
        if compiled is not None:
            self._offer_compile_cache(vllm_config, compiled, identity)
        return model.eval()

    def _compile_cache(self, vllm_config, identity: RankIdentity, presence, result: LoadResult):
        """Fetch this rank's compile cache entry before vLLM compiles; sets the result's
        `compile_cache`. Returns the compile identity when there is one to offer later."""
        if not self.config.settings.compile_cache:
            result.compile_cache = "none: turned off (compile_cache: false)"
            return None
        compiled = compile_cache.compile_identity(vllm_config)
        if isinstance(compiled, str):
            result.compile_cache = f"none: {compiled}"
            return None
        sources = [result.peer] if result.source == "peer" and result.peer else []
        if presence is not None:
            sources += presence.cache_sources(compiled.key)
        sources += self.config.sources_for_rank(identity.rank)
        result.compile_cache = compile_cache.obtain(
            compiled, list(dict.fromkeys(sources)), self.config.settings,
            serving.cluster_keys(self.config),
        )
        return compiled

    def _offer_compile_cache(self, vllm_config, compiled, identity: RankIdentity) -> None:
        if not serving.warm_up.watched:
            log.info("rank %d: compile cache not offered: vLLM's warm-up is not observable here",
                     identity.rank)
            return
        rank = identity.rank
        serving.warm_up.after(
            lambda: compile_cache.offer_when_compiled(
                vllm_config, compiled, self.config.settings, serving.cluster_keys(self.config),
                lambda: serving.server_for_rank(rank),
            )
        )

    def _join_mesh(self, identity: RankIdentity, model_config: ModelConfig) -> MeshPresence | None:
        if self.config.mesh is None:
            return None
        presence = MeshPresence(
            self.config.mesh,
            identity,
            serving.cluster_keys(self.config),
            model_config.model,
            vllm_compat.VLLM_VERSION,
        )
        presence.start()
        on_process_exit(presence.stop)
        return presence

    def _fill_weights(
        self,
        model: nn.Module,
        model_config: ModelConfig,
        identity: RankIdentity,
        presence: MeshPresence | None,
        started: float,
        layout=None,
    ) -> tuple[LoadResult, object]:
        """Fetch from a peer or load from disk. Returns the result and the rank's server:
        a relay started before the fetch, forwarding verified buckets to instances that
        start after this one, and serving everything once the weights are complete."""
        if not self.config.serves:
            log.info(
                "rank %d: serving weights to other instances is off; set LISTEN_PORT "
                "(or SOURCE, or mesh) in --model-loader-extra-config to turn it on",
                identity.rank,
            )
        serve_start = time.monotonic()
        tensors = servable_tensors(model)  # the relay serves the very dict being filled
        relay = serving.start_relay(tensors, identity, self.config, layout)
        if presence is not None and relay is not None:
            presence.publish(relay)  # state "attaching": not a source until receiving
        serve_start = time.monotonic() - serve_start
        try:
            result = self._fetch_or_read(
                model, model_config, identity, presence, relay, tensors, started, layout
            )
            result.phases["serve_start"] = serve_start
        except BaseException:
            if relay is not None:
                serving.stop_server(relay)
            raise
        if relay is not None:
            relay.strategy.fetch_succeeded()
        return result, relay

    def _fetch_or_read(
        self, model, model_config, identity, presence, relay, tensors, started, layout=None
    ) -> LoadResult:
        phases: dict[str, float] = {}
        lookup = time.monotonic()
        plan: SourcePlan = plan_sources(identity, self.config, presence)
        phases["lookup"] = time.monotonic() - lookup
        failures = list(plan.failures)
        if (plan.sources or plan.reshard) and identity.fingerprint and tensors is not None:
            transfer = time.monotonic()
            outcome = self._fetch(plan, identity, presence, relay, tensors)
            if not outcome.ok and relay is not None:
                # downstream sessions may still wait for an upstream to resume: end them
                # before resharding or the disk load write into the tensors they read
                relay.strategy.invalidate("no peer of this shape served the weights")
            if not outcome.ok and plan.reshard and layout is not None:
                outcome = reshard_after(outcome, plan.reshard, layout, tensors, self._request(identity, tensors))
            phases["transfer"] = time.monotonic() - transfer
            failures += outcome.failures
            if outcome.ok:
                return LoadResult(
                    identity.rank,
                    "peer",
                    outcome.peer,
                    outcome.bytes,
                    time.monotonic() - started,
                    describe_failures(failures),
                    phases,
                    peers=outcome.peers or None,
                )
        elif tensors is None:
            failures.append(("-", "model has parameters on the meta device (online quantization)"))
        log.info("rank %d: loading from disk (%s)", identity.rank, describe_failures(failures))
        # The peer may have written part of the weights; the disk load rewrites every one.
        disk = time.monotonic()
        try:
            self._disk.load_weights(model, model_config)
            phases["disk"] = time.monotonic() - disk
        except Exception as exc:
            raise RuntimeError(
                f"netloader rank {identity.rank}: no peer served the weights "
                f"({describe_failures(failures) or 'no sources'}) and loading from disk failed: {exc}"
            ) from exc
        # the disk load wrote into the same parameters (meta ones have storage only now)
        if tensors is None:
            tensors = servable_tensors(model) or {}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return LoadResult(
            identity.rank,
            "disk",
            None,
            nbytes,
            time.monotonic() - started,
            describe_failures(failures) or "no sources",
            phases,
        )

    def _request(self, identity, tensors, observer=None, in_place=False) -> FetchRequest:
        return FetchRequest(
            identity.fingerprint, tensors, identity.rank, self.config.settings,
            serving.cluster_keys(self.config), observer, in_place=in_place,
        )

    def _fetch(self, plan: SourcePlan, identity, presence, relay, tensors) -> FetchOutcome:
        """Mesh upstreams first (re-attaching while the table offers any), then SOURCE.
        Both stages fill `tensors`, tell the relay and share one resume state, so a later
        source only sends what an interrupted one did not."""
        keys = serving.cluster_keys(self.config)
        if keys is None:
            log.warning(
                "rank %d: fetching weights without authentication: a host on the path can "
                "impersonate the source and serve wrong weights; set secret_file (a file made "
                "with `mesh keygen PATH`, the same on every instance) to authenticate sources",
                identity.rank,
            )
        # the tensors are a model just built: nothing in them counts but what the request
        # verifies, so direct buckets may be received in place
        request = self._request(
            identity, tensors, relay.strategy if relay is not None else None, in_place=True
        )
        if not plan.sources:
            return FetchOutcome(False, None, 0, 0.0)
        failures: list[tuple[str, str]] = []
        if plan.mesh and presence is not None:
            mesh = self.config.mesh
            policy = ReattachPolicy(
                deadline_s=mesh.attach_timeout_s, idle_s=mesh.wait_timeout_s, zone=mesh.zone
            )
            self_endpoint = relay.endpoint if relay is not None else ""
            table = presence.upstream_reader()
            outcome = fetch_with_reattach(
                table.rows, self_endpoint, request, policy, table.wait_for_change, table.waiting
            )
            if outcome.ok or not plan.static:
                return outcome
            failures = outcome.failures
        outcome = request.from_sources(plan.static)
        outcome.failures[:0] = failures
        return outcome


def _same_storage(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor] | None) -> bool:
    if b is None or a.keys() != b.keys():
        return False
    return all(a[k].data_ptr() == b[k].data_ptr() and a[k].shape == b[k].shape for k in a)


def servable_tensors(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Parameters by name, each storage once (tied weights keep the first name).

    None when a parameter has no storage yet (meta device): such a model cannot be
    filled by a byte copy.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, param in model.named_parameters(remove_duplicate=True):
        if param.is_meta:
            return None
        if param.numel() == 0:
            continue
        key = (param.untyped_storage().data_ptr(), param.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = param.data
    return tensors


def _disk_load_config(load_config: LoadConfig) -> LoadConfig:
    disk = copy.copy(load_config)
    disk.load_format = "auto"
    disk.model_loader_extra_config = {}
    return disk
