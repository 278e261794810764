"""The example configs users copy must parse."""

import json
from pathlib import Path

import pytest

from loader.config import parse_extra_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_example_config_parses(name, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # CONFIG_FILE paths are relative to the repo root
    raw = json.loads((CONFIGS / name).read_text())
    if name == "sources.json":
        raw = {"CONFIG_FILE": "configs/sources.json"}
    cfg = parse_extra_config(raw, environ={})
    assert cfg is not None


def test_config_file_example_takes_its_sources_from_the_file(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    cfg = parse_extra_config(json.loads((CONFIGS / "static-sources-file.json").read_text()), environ={})
    assert cfg.sources_for_rank(1) == ["10.0.0.11:4001"]
