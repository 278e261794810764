"""This worker's RankIdentity (rank, shape and fingerprint), computed from vLLM's config."""

from __future__ import annotations

import logging
import os

import torch

from loader.config import NetloaderConfig
from loader.distribution.peer_record import RankIdentity
from loader.integration.fingerprint import compute_content_id, compute_fingerprint
from loader.integration.vllm_compat import VLLM_VERSION, ModelConfig, VllmConfig

log = logging.getLogger(__name__)


def global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def local_model_dir(model_config: ModelConfig) -> str | None:
    """The directory holding config.json and the weights, without downloading anything."""
    if os.path.isdir(model_config.model):
        return model_config.model
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            model_config.model, revision=model_config.revision, local_files_only=True
        )
    except Exception:  # not in the local hub cache: no files to fingerprint
        return None


def rank_identity(
    vllm_config: VllmConfig, model_config: ModelConfig, config: NetloaderConfig
) -> RankIdentity:
    parallel = vllm_config.parallel_config
    rank = global_rank()
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    device = str(vllm_config.device_config.device)
    weights = dict(
        model_dir=local_model_dir(model_config),
        model_id=config.model,
        dtype=str(model_config.dtype),
        quantization=model_config.quantization,
        vllm_version=VLLM_VERSION,
    )
    try:
        fingerprint = compute_fingerprint(tp=tp, pp=pp, rank=rank, **weights)
        return RankIdentity(rank, tp, pp, device, fingerprint, content=compute_content_id(**weights))
    except (ValueError, OSError) as exc:
        log.warning("rank %d: no fingerprint, peers cannot be used: %s", rank, exc)
        return RankIdentity(rank, tp, pp, device, None, str(exc))
