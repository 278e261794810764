import json

import pytest

from loader.config import (
    ENV_MESH_SECRET_FILE,
    ENV_MESH_SEEDS,
    NetloaderConfig,
    TransferSettings,
    parse_extra_config,
)

GOOD = {
    "SOURCE": [
        {"device_id": 0, "sources": ["10.0.0.1:4000", "node-b:4000"]},
        {"device_id": 1, "sources": ["10.0.0.1:4001"]},
        {"device_id": 0, "sources": ["10.0.0.1:4000", "[::1]:4000"]},
    ],
    "MODEL": "tiny-llama@rev1",
    "LISTEN_PORT": 4000,
    "OUTPUT_PREFIX": "/tmp/netloader-",
    "mesh": {"seeds": ["seed-a:7946"], "bind": "0.0.0.0:0", "zone": "rack1", "wait_timeout_s": 3,
             "attach_timeout_s": 60, "secret_file": "/etc/netloader/cluster.secret"},
    "connect_timeout_s": 1.5,
    "bucket_mb": 32,
    "max_concurrent_clients": 2,
    "listen_host": "127.0.0.1",
}


def test_good_config_parses_every_key():
    cfg = parse_extra_config(GOOD, environ={})
    assert cfg.sources_for_rank(0) == ["10.0.0.1:4000", "node-b:4000", "[::1]:4000"]
    assert cfg.sources_for_rank(1) == ["10.0.0.1:4001"]
    assert cfg.sources_for_rank(2) == []
    assert cfg.model == "tiny-llama@rev1"
    assert cfg.port_for_rank(3) == 4003
    assert cfg.output_prefix == "/tmp/netloader-"
    assert cfg.mesh.seeds == ("seed-a:7946",) and cfg.mesh.zone == "rack1"
    assert cfg.mesh.wait_timeout_s == 3.0 and cfg.mesh.attach_timeout_s == 60.0
    assert cfg.secret_file == "/etc/netloader/cluster.secret" and cfg.mesh.insecure is False
    s = cfg.settings
    assert (s.connect_timeout_s, s.bucket_mb, s.max_concurrent_clients) == (1.5, 32, 2)
    assert s.bucket_bytes == 32 << 20 and s.listen_host == "127.0.0.1"


def test_json_string_none_and_empty_are_accepted():
    assert parse_extra_config(json.dumps(GOOD), environ={}) == parse_extra_config(GOOD, environ={})
    empty = parse_extra_config(None, environ={})
    assert empty == NetloaderConfig() and empty.settings == TransferSettings()
    assert parse_extra_config("", environ={}).mesh is None
    assert parse_extra_config({}, environ={}).port_for_rank(5) == 0


@pytest.mark.parametrize(
    "raw, key",
    [
        ("{'SOURCE': []}", "model-loader-extra-config"),  # a Python dict repr, not JSON
        ("[1, 2]", "model-loader-extra-config"),
        ({"NOPE": 1}, "NOPE"),
        ({"source": []}, "source"),
        ({"LISTEN_PORT": -1}, "LISTEN_PORT"),
        ({"LISTEN_PORT": 80}, "LISTEN_PORT"),
        ({"LISTEN_PORT": 70000}, "LISTEN_PORT"),
        ({"LISTEN_PORT": "4000"}, "LISTEN_PORT"),
        ({"LISTEN_PORT": True}, "LISTEN_PORT"),
        ({"SOURCE": {"device_id": 0}}, "SOURCE"),
        ({"SOURCE": [{"device_id": 0}]}, "SOURCE[0].sources"),
        ({"SOURCE": [{"sources": ["a:1"]}]}, "SOURCE[0].device_id"),
        ({"SOURCE": [{"device_id": -1, "sources": []}]}, "SOURCE[0].device_id"),
        ({"SOURCE": [{"device_id": True, "sources": []}]}, "SOURCE[0].device_id"),
        ({"SOURCE": [{"device_id": 0, "sources": "a:1"}]}, "SOURCE[0].sources"),
        ({"SOURCE": [{"device_id": 0, "sources": ["a"]}]}, "SOURCE[0].sources[0]"),
        ({"SOURCE": [{"device_id": 0, "sources": ["a:0"]}]}, "SOURCE[0].sources[0]"),
        ({"SOURCE": [{"device_id": 0, "sources": ["a:99999"]}]}, "SOURCE[0].sources[0]"),
        ({"SOURCE": [{"device_id": 0, "sources": ["a b:1"]}]}, "SOURCE[0].sources[0]"),
        ({"SOURCE": [{"device_id": 0, "sources": [], "x": 1}]}, "SOURCE[0].x"),
        ({"MODEL": 3}, "MODEL"),
        ({"MODEL": ""}, "MODEL"),
        ({"OUTPUT_PREFIX": ["x"]}, "OUTPUT_PREFIX"),
        ({"CONFIG_FILE": "/nonexistent/netloader.json"}, "CONFIG_FILE"),
        ({"mesh": []}, "mesh"),
        ({"mesh": {"seeds": "a:1"}}, "mesh.seeds"),
        ({"mesh": {"seeds": ["a"]}}, "mesh.seeds[0]"),
        ({"mesh": {"bind": "nohost"}}, "mesh.bind"),
        ({"mesh": {"colour": "red"}}, "mesh.colour"),
        ({"mesh": {"zone": 5}}, "mesh.zone"),
        ({"mesh": {"wait_timeout_s": -2}}, "mesh.wait_timeout_s"),
        ({"mesh": {"attach_timeout_s": "5m"}}, "mesh.attach_timeout_s"),
        ({"mesh": {"attach_timeout_s": 0}}, "mesh.attach_timeout_s"),
        ({"mesh": {"insecure": "true"}}, "mesh.insecure"),
        ({"mesh": {"insecure": 1}}, "mesh.insecure"),
        ({"mesh": {"seeds": ["a:1"]}}, "mesh.secret_file"),
        ({"connect_timeout_s": 0}, "connect_timeout_s"),
        ({"handshake_timeout_s": "5"}, "handshake_timeout_s"),
        ({"bucket_timeout_s": False}, "bucket_timeout_s"),
        ({"bucket_mb": 0}, "bucket_mb"),
        ({"bucket_mb": 1.5}, "bucket_mb"),
        ({"max_concurrent_clients": 0}, "max_concurrent_clients"),
        ({"streams": 0}, "streams"),
        ({"streams": 9}, "streams"),
        ({"streams": "2"}, "streams"),
        ({"ping_interval_s": 0}, "ping_interval_s"),
        ({"ping_interval_s": 1.5}, "ping_interval_s"),  # over half the 2 s silence timeout
        ({"ping_interval_s": 3, "silence_timeout_s": 5}, "ping_interval_s"),
        ({"silence_timeout_s": "2"}, "silence_timeout_s"),
        ({"listen_host": "not a host"}, "listen_host"),
        ({"secret_file": 7}, "secret_file"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(raw, key):
    with pytest.raises(ValueError) as info:
        parse_extra_config(raw, environ={})
    assert str(info.value).startswith(key), str(info.value)


def test_config_file_source_takes_priority(tmp_path):
    path = tmp_path / "netloader.json"
    path.write_text(json.dumps({"SOURCE": [{"device_id": 0, "sources": ["file-host:5000"]}]}))
    cfg = parse_extra_config(
        {"CONFIG_FILE": str(path), "SOURCE": [{"device_id": 0, "sources": ["inline:5000"]}]},
        environ={},
    )
    assert cfg.sources_for_rank(0) == ["file-host:5000"]
    assert cfg.config_file == str(path)


def test_config_file_content_is_validated(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"SOURCE": [{"device_id": 0}]}))
    with pytest.raises(ValueError, match=r"^SOURCE\[0\]\.sources"):
        parse_extra_config({"CONFIG_FILE": str(path)}, environ={})
    path.write_text("not json")
    with pytest.raises(ValueError, match="^CONFIG_FILE"):
        parse_extra_config({"CONFIG_FILE": str(path)}, environ={})


def test_environment_fallbacks_for_mesh():
    env = {ENV_MESH_SEEDS: "a:1, b:2,", ENV_MESH_SECRET_FILE: "/etc/netloader/secret"}
    cfg = parse_extra_config({}, environ=env)
    assert cfg.mesh.seeds == ("a:1", "b:2")
    assert cfg.mesh.secret_file == "/etc/netloader/secret"
    assert cfg.secret_file == "/etc/netloader/secret"
    explicit = parse_extra_config({"mesh": {"seeds": ["c:3"], "secret_file": "/s"}}, environ=env)
    assert explicit.mesh.seeds == ("c:3",) and explicit.mesh.secret_file == "/s"
    with pytest.raises(ValueError, match=f"^{ENV_MESH_SEEDS}"):
        parse_extra_config({}, environ={ENV_MESH_SEEDS: "nohostport"})
    assert parse_extra_config({}, environ={}).mesh is None


def test_mesh_without_a_secret_is_refused_with_the_way_out():
    for raw in ({"mesh": {"seeds": ["a:1"]}}, {"mesh": {"insecure": False}}):
        with pytest.raises(ValueError) as info:
            parse_extra_config(raw, environ={})
        message = str(info.value)
        assert message.startswith("mesh.secret_file")
        assert "mesh keygen /path/to/secret" in message and ENV_MESH_SECRET_FILE in message
        assert '"insecure": true' in message
    with pytest.raises(ValueError, match="^mesh.secret_file"):  # seeds from the environment
        parse_extra_config({}, environ={ENV_MESH_SEEDS: "a:1"})


def test_mesh_runs_with_a_secret_from_any_place_or_explicitly_insecure():
    mesh = {"seeds": ["a:1"]}
    from_env = parse_extra_config({"mesh": mesh}, environ={ENV_MESH_SECRET_FILE: "/e"})
    assert from_env.secret_file == "/e"
    tuning = parse_extra_config({"mesh": mesh, "secret_file": "/t"}, environ={})
    assert tuning.secret_file == "/t"
    insecure = parse_extra_config({"mesh": {**mesh, "insecure": True}}, environ={})
    assert insecure.mesh.insecure is True and insecure.secret_file is None


def test_weights_are_served_only_when_a_key_asks_for_it():
    assert not parse_extra_config({}, environ={}).serves
    assert not parse_extra_config({"MODEL": "m@1", "bucket_mb": 8}, environ={}).serves
    for raw in (
        {"LISTEN_PORT": 4000},
        {"SOURCE": [{"device_id": 0, "sources": ["a:1"]}]},
        {"mesh": {"insecure": True}},
        {"OUTPUT_PREFIX": "/tmp/ep-"},  # publishes the endpoint of a free port
    ):
        assert parse_extra_config(raw, environ={}).serves, raw


def test_transfer_secret_prefers_the_tuning_key():
    cfg = parse_extra_config({"secret_file": "/a", "mesh": {"secret_file": "/b"}}, environ={})
    assert cfg.secret_file == "/a"


def test_listen_port_plus_rank_must_fit():
    cfg = parse_extra_config({"LISTEN_PORT": 65535}, environ={})
    assert cfg.port_for_rank(0) == 65535
    with pytest.raises(ValueError, match="^LISTEN_PORT"):
        cfg.port_for_rank(1)
