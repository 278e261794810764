import subprocess
import sys

import pytest

from mesh.addresses import (
    advertise_host,
    outbound_ip,
    parse_seed_list,
    resolve_seeds,
    split_host_port,
)
from mesh.cli import main, parse_meta
from mesh.fields import valid_addr


def test_parse_meta_types():
    meta = parse_meta(["tp=2", "ready=true", "load=0.5", "fingerprint=1234", "endpoint=h:1", "note=hello"])
    assert meta == {"tp": 2, "ready": True, "load": 0.5, "fingerprint": "1234", "endpoint": "h:1",
                    "note": "hello"}
    with pytest.raises(ValueError):
        parse_meta(["novalue"])


def test_split_host_port():
    assert split_host_port("127.0.0.1:5") == ("127.0.0.1", 5)
    assert split_host_port("[::1]:7946") == ("::1", 7946)
    for bad in ("nohost", "h:port", "h:70000"):
        with pytest.raises(ValueError):
            split_host_port(bad)



def test_one_parser_serves_bind_config_and_wire():
    assert split_host_port("*:0", wildcard=True) == ("*", 0)
    assert split_host_port("[::]:7946") == ("::", 7946)
    for bad in ("*:1", "a b:1", "a:1\n", "a:+1"):
        with pytest.raises(ValueError):
            split_host_port(bad)
    with pytest.raises(ValueError, match="out of range"):
        split_host_port("a:0", min_port=1)
    assert valid_addr("h:1") and valid_addr("[::1]:1")
    assert not valid_addr("::1:1") and not valid_addr("h:0") and not valid_addr(None)


def test_outbound_ip_prefers_the_route_to_a_target():
    assert outbound_ip(["127.0.0.1"]) == "127.0.0.1"
    assert outbound_ip(["not an address"]) not in ("", "0.0.0.0")


def test_seeds_resolve_to_all_addresses_and_bad_seeds_are_skipped():
    resolved = resolve_seeds(["localhost:7946", "127.0.0.1:7947", "no-such-host.invalid:1", "garbage"])
    assert "127.0.0.1:7946" in resolved and "127.0.0.1:7947" in resolved
    assert all(not a.startswith("no-such") for a in resolved)
    assert parse_seed_list(" a:1, b:2 ,,") == ["a:1", "b:2"]


def test_advertise_host_for_wildcard_bind():
    assert advertise_host("127.0.0.1", []) == "127.0.0.1"
    host = advertise_host("0.0.0.0", ["127.0.0.1:1"])
    assert host not in ("0.0.0.0", "")


def test_help_and_status_without_seeds(capsys, monkeypatch):
    monkeypatch.delenv("NETLOADER_MESH_SEEDS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "agent" in capsys.readouterr().out
    assert main(["status"]) == 2


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mesh.cli", "agent", "--help"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "--secret-file" in out.stdout


def test_agent_rejects_missing_secret_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mesh.cli", "agent", "--bind", "127.0.0.1:0", "--secret-file",
                          str(tmp_path / "missing")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "missing" in out.stderr
