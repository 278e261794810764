"""loader.integration.vllm_compat: every vLLM API the loader uses is found once, at import, and a vLLM
that lacks one (or changed its shape) is named, with its version, at engine start."""

import abc
import json
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from loader.integration import vllm_compat
from loader.integration.vllm_compat import TESTED, VllmCompatError, probe
from tests.compat import wheel_api

REPO = Path(__file__).resolve().parents[1]
ML = "vllm.model_executor.model_loader"


def fake_vllm(version: str = "0.29.0") -> dict[str, SimpleNamespace]:
    """Modules shaped like the vLLM releases the loader supports."""

    class BaseModelLoader(abc.ABC):
        def __init__(self, load_config):
            self.load_config = load_config

        @abc.abstractmethod
        def download_model(self, model_config): ...

        @abc.abstractmethod
        def load_weights(self, model, model_config): ...

        def create_model(self, vllm_config, model_config, prefix=""):
            return None

    class DefaultModelLoader(BaseModelLoader):
        def download_model(self, model_config): ...

        def load_weights(self, model, model_config): ...

    @dataclass
    class LoadConfig:
        load_format: str = "auto"
        model_loader_extra_config: dict = field(default_factory=dict)
        device: str | None = None

    @dataclass
    class ModelConfig:
        model: str = ""
        revision: str | None = None
        dtype: str = "auto"
        quantization: str | None = None

    @dataclass
    class VllmConfig:
        device_config: object = None
        load_config: object = None
        parallel_config: object = None
        compilation_config: object = None
        model_config: object = None

        def compute_hash(self):
            return "0" * 10

    @dataclass
    class EngineArgs:
        load_format: str = "auto"
        model_loader_extra_config: dict = field(default_factory=dict)

        def create_model_config(self):
            return ModelConfig()

    def register_model_loader(load_format):
        return lambda cls: cls

    return {
        "vllm": SimpleNamespace(__version__=version),
        ML: SimpleNamespace(
            register_model_loader=register_model_loader,
            BaseModelLoader=BaseModelLoader,
            DefaultModelLoader=DefaultModelLoader,
        ),
        f"{ML}.base_loader": SimpleNamespace(
            BaseModelLoader=BaseModelLoader, _has_online_quant=lambda model: False
        ),
        f"{ML}.utils": SimpleNamespace(
            process_weights_after_loading=lambda model, model_config, target_device: None
        ),
        f"{ML}.reload": SimpleNamespace(
            finalize_layerwise_processing=lambda model, model_config: None
        ),
        "vllm.utils.torch_utils": SimpleNamespace(set_default_torch_dtype=lambda dtype: None),
        "vllm.envs": SimpleNamespace(compile_factors=lambda: {}),
        "vllm.engine.arg_utils": SimpleNamespace(EngineArgs=EngineArgs),
        "vllm.config": SimpleNamespace(
            LoadConfig=LoadConfig, ModelConfig=ModelConfig, VllmConfig=VllmConfig
        ),
        **fake_layers(),
    }


def fake_layers() -> dict[str, SimpleNamespace]:
    """The layer classes resharding describes (optional pieces), by module."""
    class Layer(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

    modules: dict[str, dict] = {}
    for need in vllm_compat.LAYER_NEEDS:
        module, _, name = need.where[0].partition(":")
        modules.setdefault(module, {})[name] = type(name, (Layer,), {})
    return {module: SimpleNamespace(**classes) for module, classes in modules.items()}


def importer(modules: dict):
    def import_module(name):
        if name not in modules:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return modules[name]

    return import_module


def test_a_release_shaped_like_the_supported_ones_has_no_problems():
    surface = probe(importer(fake_vllm()))
    assert surface.problems == {} and surface.version == "0.29.0"
    assert surface.where["set_default_torch_dtype"] == "vllm.utils.torch_utils:set_default_torch_dtype"


def test_a_missing_required_piece_is_named_with_the_vllm_version():
    modules = fake_vllm()
    del modules[f"{ML}.utils"].process_weights_after_loading
    surface = probe(importer(modules))
    assert list(surface.missing()) == ["process_weights_after_loading"]
    message = str(surface.error())
    assert "vLLM 0.29.0" in message
    assert "process_weights_after_loading" in message and "is not there" in message
    assert all(version in message for version in TESTED)


def test_a_changed_signature_is_caught_at_import_not_when_called():
    modules = fake_vllm()
    modules[f"{ML}.utils"].process_weights_after_loading = lambda model, model_config: None
    modules[ML].register_model_loader = lambda load_format, *, priority: None  # new keyword
    surface = probe(importer(modules))
    assert set(surface.missing()) == {"process_weights_after_loading", "register_model_loader"}
    assert "cannot be called as (model, model_config, target_device)" in (
        surface.problems["process_weights_after_loading"]
    )
    assert "priority" in surface.problems["register_model_loader"]


def test_a_moved_helper_is_found_where_older_releases_keep_it():
    modules = fake_vllm()
    del modules["vllm.utils.torch_utils"]  # an older release: no vllm.utils.torch_utils
    modules[f"{ML}.utils"].set_default_torch_dtype = lambda dtype: None
    surface = probe(importer(modules))
    assert surface.problems == {}
    assert surface.where["set_default_torch_dtype"] == f"{ML}.utils:set_default_torch_dtype"


def test_a_public_path_is_preferred_and_the_private_module_is_the_fallback():
    modules = fake_vllm()
    assert probe(importer(modules)).where["BaseModelLoader"] == f"{ML}:BaseModelLoader"
    del modules[ML].BaseModelLoader
    assert probe(importer(modules)).where["BaseModelLoader"] == f"{ML}.base_loader:BaseModelLoader"


def test_without_the_private_online_quant_helper_the_loader_uses_its_own_test():
    modules = fake_vllm()
    del modules[f"{ML}.base_loader"]._has_online_quant
    del modules[f"{ML}.reload"]  # and a release without online quantization at all
    surface = probe(importer(modules))
    assert surface.missing() == {}  # optional: nothing stops the engine
    assert set(surface.problems) == {"has_online_quant", "finalize_layerwise_processing"}

    plain = nn.Linear(2, 2)
    assert not vllm_compat._uses_meta_device(plain)
    plain.quant_method = SimpleNamespace(uses_meta_device=True)
    assert vllm_compat._uses_meta_device(nn.Sequential(plain))


def test_an_online_quantized_model_on_a_vllm_without_finalize_gets_the_named_error(monkeypatch):
    modules = fake_vllm()
    del modules[f"{ML}.reload"]
    monkeypatch.setattr(vllm_compat, "SURFACE", probe(importer(modules)))
    finalize = vllm_compat._missing("finalize_layerwise_processing")
    with pytest.raises(VllmCompatError, match=r"vLLM 0\.29\.0.*finalize_layerwise_processing"):
        finalize(nn.Linear(2, 2), None)


def test_a_new_abstract_method_on_base_model_loader_is_reported():
    modules = fake_vllm()
    base = modules[ML].BaseModelLoader

    class Newer(base):
        @abc.abstractmethod
        def iterate_weights(self, model_config): ...

    modules[ML].BaseModelLoader = modules[f"{ML}.base_loader"].BaseModelLoader = Newer
    surface = probe(importer(modules))
    assert "iterate_weights" in surface.missing()["BaseModelLoader"]


def test_a_config_without_a_field_the_loader_reads_is_reported():
    modules = fake_vllm()

    @dataclass
    class LoadConfig:
        load_format: str = "auto"
        model_loader_extra_config: dict = field(default_factory=dict)

    modules["vllm.config"].LoadConfig = LoadConfig
    surface = probe(importer(modules))
    assert "has no field device" in surface.missing()["LoadConfig"]


def test_no_importable_vllm_names_every_piece():
    surface = probe(importer({}))
    assert surface.version.startswith("(vllm not importable")
    assert set(surface.missing()) == vllm_compat.REQUIRED
    assert "cannot be imported (ModuleNotFoundError" in surface.problems["LoadConfig"]


def test_require_raises_and_registration_is_refused_with_a_logged_reason(monkeypatch, caplog):
    modules = fake_vllm()
    del modules[ML].register_model_loader
    monkeypatch.setattr(vllm_compat, "SURFACE", probe(importer(modules)))
    with pytest.raises(VllmCompatError, match=r"vLLM 0\.29\.0 .*register_model_loader"):
        vllm_compat.require()
    caplog.set_level(logging.ERROR, logger="loader.integration.vllm_compat")
    assert vllm_compat.register_loader("netloader", object) is False  # never raises
    [record] = caplog.records
    assert "--load-format netloader is unavailable" in record.getMessage()
    assert "vLLM 0.29.0" in record.getMessage()


@pytest.mark.compat
def test_the_installed_vllm_offers_everything_the_loader_uses():
    import vllm

    assert vllm_compat.VLLM_VERSION == vllm.__version__
    expected = os.environ.get("NETLOADER_EXPECT_VLLM")  # set by make test-compat
    if expected:
        assert vllm_compat.VLLM_VERSION == expected
    assert vllm_compat.SURFACE.problems == {}, vllm_compat.SURFACE.problems
    assert vllm_compat.VLLM_VERSION in TESTED
    vllm_compat.require()


# Run in a fresh process: the adapter probes vLLM once, when first imported. Removes
# pieces from the real vLLM first, then does what vLLM does: run the plugin, then ask
# for the loader of --load-format netloader (as the engine does when it starts).
ENGINE_START = textwrap.dedent("""
    import json, sys
    import vllm.model_executor.model_loader.base_loader as base_loader
    import vllm.model_executor.model_loader.utils as utils
    MUTATION
    out = {}
    try:
        from loader.integration.plugin import register
        register()
        out["registered"] = True
    except Exception as exc:
        out["registered"] = f"{type(exc).__name__}: {exc}"
    try:
        from vllm.config import LoadConfig
        from vllm.model_executor.model_loader import get_model_loader
        get_model_loader(LoadConfig(load_format="netloader"))
        out["loader"] = "created"
    except Exception as exc:
        out["loader"] = f"{type(exc).__name__}: {exc}"
    import vllm
    out["version"] = vllm.__version__
    print("RESULT " + json.dumps(out))
""")


MUTATIONS = {
    # a release without a private helper (optional) and without a required function
    "removed": "del base_loader._has_online_quant; del utils.process_weights_after_loading",
    # a release whose function takes other arguments: a TypeError at load time otherwise
    "changed": "utils.process_weights_after_loading = lambda model, model_config: None",
}


@pytest.mark.compat
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_vllm_lacking_a_piece_stops_the_engine_with_the_named_error(mutation):
    script = ENGINE_START.replace("MUTATION", MUTATIONS[mutation])
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, proc.stderr[-2000:]
    out = json.loads(lines[0][len("RESULT "):])
    # the plugin still registers: vLLM runs it in every process, whatever the load format
    assert out["registered"] is True, out
    # creating the loader (at engine start, before any weight moves) names what is wrong
    assert out["loader"].startswith("VllmCompatError: "), out
    assert f"vLLM {out['version']}" in out["loader"]
    assert "process_weights_after_loading" in out["loader"]
    assert "_has_online_quant" not in out["loader"]  # optional: the loader has its own test
    if mutation == "changed":
        assert "cannot be called as (model, model_config, target_device)" in out["loader"]


# --- the source check used for releases that cannot run here (tests/compat/wheel_api.py)


def test_reading_the_installed_vllm_from_source_agrees_with_importing_it():
    import vllm

    site = Path(vllm.__file__).parents[1]
    surface = wheel_api.check(site)
    assert surface.version == vllm_compat.VLLM_VERSION
    assert surface.problems == vllm_compat.SURFACE.problems == {}
    assert surface.where == vllm_compat.SURFACE.where


FAKE_SOURCE = {
    "vllm/__init__.py": "from .version import __version__\n",
    "vllm/_version.py": "__version__ = version = '9.9.9'\n",
    "vllm/version.py": "from ._version import __version__\n",
    "vllm/config/__init__.py": "from vllm.config.load import LoadConfig\n"
    "from vllm.config.model import ModelConfig\nfrom vllm.config.vllm import VllmConfig\n",
    "vllm/config/load.py": "class LoadConfig:\n    load_format: str = 'auto'\n"
    "    model_loader_extra_config: dict = None\n    device: str | None = None\n",
    "vllm/config/model.py": "class ModelConfig:\n    model: str\n    revision: str\n"
    "    dtype: str\n    quantization: str\n",
    "vllm/config/vllm.py": "class VllmConfig:\n    device_config: object\n"
    "    load_config: object\n    parallel_config: object\n",
    f"{ML.replace('.', '/')}/__init__.py": "from .base_loader import BaseModelLoader\n"
    "from .default_loader import DefaultModelLoader\n"
    "def register_model_loader(load_format):\n    pass\n",
    f"{ML.replace('.', '/')}/base_loader.py": textwrap.dedent("""
        from abc import ABC, abstractmethod
        class BaseModelLoader(ABC):
            def __init__(self, load_config): ...
            @abstractmethod
            def download_model(self, model_config): ...
            @abstractmethod
            def load_weights(self, model, model_config): ...
            def create_model(self, vllm_config, model_config, prefix=""):
                return None
        def _has_online_quant(model): ...
    """),
    f"{ML.replace('.', '/')}/default_loader.py": textwrap.dedent("""
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader
        class DefaultModelLoader(BaseModelLoader):
            def __init__(self, load_config): ...
            def download_model(self, model_config): ...
            def load_weights(self, model, model_config): ...
    """),
    # a release where post-processing takes a keyword-only argument the loader never passes
    f"{ML.replace('.', '/')}/utils.py": "def process_weights_after_loading(model, model_config, "
    "*, target_device, stream=None): ...\n",
    "vllm/utils/__init__.py": "",
    "vllm/utils/torch_utils.py": "def set_default_torch_dtype(dtype): ...\n",
}


def test_the_source_check_reports_a_changed_signature_and_exits_non_zero(tmp_path, capsys):
    for name, text in FAKE_SOURCE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    surface = wheel_api.check(tmp_path)
    assert surface.version == "9.9.9"
    assert list(surface.missing()) == ["process_weights_after_loading"]
    assert "target_device" in surface.problems["process_weights_after_loading"]
    assert "finalize_layerwise_processing" in surface.problems  # optional, absent
    assert wheel_api.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "MISSING  process_weights_after_loading" in out and "vLLM 9.9.9" in out

    (tmp_path / ML.replace(".", "/") / "utils.py").write_text(
        "def process_weights_after_loading(model, model_config, target_device): ...\n"
    )
    assert wheel_api.main([str(tmp_path)]) == 0


def test_set_default_torch_dtype_from_the_adapter_works():
    with vllm_compat.set_default_torch_dtype(torch.float64):
        assert torch.tensor([1.0]).dtype == torch.float64
    assert torch.tensor([1.0]).dtype == torch.float32
