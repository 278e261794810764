import json

from loader.integration.result import RESULT_PREFIX, LoadResult, log_result
from loader.integration.vllm_compat import VLLM_VERSION
from tests.support.vllm_process import RESULT_LINE


def test_result_line_is_one_parseable_json_object_with_contract_fields(caplog):
    caplog.set_level("INFO", logger="loader.integration.result")
    log_result(LoadResult(3, "peer", "10.0.0.5:47003", 1234, 1.23456, None,
                          {"lookup": 0.1, "transfer": 0.9}))
    [record] = caplog.records
    line = record.getMessage()
    assert line.startswith(RESULT_PREFIX) and "\n" not in line
    payload = json.loads(RESULT_LINE.search(line).group(1))
    assert payload == {"rank": 3, "source": "peer", "peer": "10.0.0.5:47003", "bytes": 1234,
                       "seconds": 1.235, "fallback_reason": None, "retained_bytes": 0, "vllm": VLLM_VERSION,
                       "compile_cache": "none: not looked for", "lookup_s": 0.1, "transfer_s": 0.9}


def test_disk_result_carries_the_reason():
    payload = json.loads(LoadResult(0, "disk", None, 10, 2.0, "a:1: refused").to_json())
    assert payload["source"] == "disk" and payload["peer"] is None
    assert payload["fallback_reason"] == "a:1: refused"
    assert isinstance(payload["seconds"], float)


def test_result_names_the_vllm_version_in_use():
    import vllm

    payload = json.loads(LoadResult(0, "disk", None, 10, 2.0, None).to_json())
    assert payload["vllm"] == vllm.__version__
