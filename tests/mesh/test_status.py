"""`mesh status` output never talks to the terminal, whatever members put in their metadata."""

import re

import orjson
import pytest

from mesh import cli
from mesh.status import format_table, printable

# C0 (but newline), DEL, C1; ESC is in C0
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")

HOSTILE_ROWS = [
    {"name": "evil", "addr": "10.0.0.1:7946", "state": "alive", "incarnation": 3,
     "meta": {"fingerprint": "\x1b[2Jwiped", "rank": "\x9b31m", "endpoint": "\x1b]0;title\x07h:1",
              "load": "\x7f\x00", "tp": "\x1b[H", "pp": 1},
     "rtt": 0.001, "last_heard": 0.5},
    {"name": "plain", "addr": "10.0.0.2:7946", "state": "suspect", "incarnation": 1,
     "meta": {"fingerprint": "abc"}, "rtt": None, "last_heard": None},
]


def test_printable_replaces_escape_sequences_and_control_characters():
    assert printable("a\x1b[2Jb") == "a?b"
    assert printable("\x9b31mred") == "?red"
    assert printable("\x1b]0;t\x07") == "?0;t?"
    assert printable("x\x7fy\x00z\u202e\u2028") == "x?y?z??"
    assert printable("ünïcode ok – fine") == "ünïcode ok – fine"


def test_table_has_no_terminal_control_characters():
    table = format_table(HOSTILE_ROWS)
    assert not CONTROL.search(table)
    evil = next(line for line in table.splitlines() if line.startswith("evil"))
    assert "?wiped" in evil and "?31m" not in evil and "?" in evil


@pytest.mark.parametrize("watch", [False, True])
def test_status_output_has_no_control_characters_but_its_own_screen_refresh(watch, monkeypatch, capsys):
    monkeypatch.setattr(cli, "query_members", lambda seeds, keys, timeout_s: ("resp\x1b[2J", HOSTILE_ROWS))

    def stop(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", stop)
    args = ["status", "--insecure", "--seeds", "10.0.0.1:7946"] + (["--watch"] if watch else [])
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    if watch:
        assert out.startswith("\x1b[H\x1b[2J")
        out = out[len("\x1b[H\x1b[2J"):]
    assert not CONTROL.search(out)
    assert "evil" in out and "plain" in out


def test_status_json_stays_valid_json_with_values_unchanged(monkeypatch, capsys):
    monkeypatch.setattr(cli, "query_members", lambda seeds, keys, timeout_s: ("resp", HOSTILE_ROWS))
    assert cli.main(["status", "--insecure", "--seeds", "10.0.0.1:7946", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out) == HOSTILE_ROWS


def test_table_shows_the_bytes_a_member_keeps_only_to_serve():
    row = {"name": "w-r0", "addr": "10.0.0.1:7946", "state": "alive", "incarnation": 1,
           "meta": {"retained_bytes": 3 * (1 << 30) // 2}}
    odd = dict(row, name="w-r1", meta={"retained_bytes": "lots"})
    header, first, second = format_table([row, odd]).splitlines()
    assert "RETAINED" in header
    assert "1.5GiB" in first.split() and "-" in second.split()
