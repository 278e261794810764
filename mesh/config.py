"""Protocol timings and limits, shared by every member of a mesh."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ProtocolConfig:
    """Durations in seconds (the `_s` fields). Defaults were tuned with
    tests/bench/bench_mesh.py --ideal (N=100, 5% loss): probing every 0.7 s keeps the
    steady payload under 500 B/s per member (not the wire bytes, which framing and ACKs
    more than double: see bench-mesh) while a crashed member is first probed within ~4.6
    intervals at p99; suspicion lasts suspicion_mult*log10(N)*probe_interval_s (2.8 s at
    N=100) once `suspicion_confirmations` independent accusers agree, and up to
    suspicion_max_mult times that when unconfirmed.
    """

    probe_interval_s: float = 0.7
    probe_timeout_s: float = 0.2
    indirect_checks: int = 3
    gossip_interval_s: float = 0.2
    gossip_fanout: int = 3
    retransmit_mult: int = 4
    sync_interval_s: float = 2.0
    suspicion_mult: float = 2.0
    suspicion_max_mult: float = 6.0
    suspicion_confirmations: int = 2
    lifeguard: bool = True
    awareness_max: int = 8
    tombstone_ttl_s: float = 60.0
    join_retry_s: float = 0.5
    join_retry_max_s: float = 5.0
    reconnect_probability: float = 0.1
    piggyback_bytes: int = 1200
    rtt_smoothing: float = 0.25
    max_members: int = 10000
