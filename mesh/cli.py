"""`mesh agent`, `mesh status` and `mesh keygen`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import orjson

from .addresses import parse_seed_list
from .api import MeshAgent
from .security import load_cluster_keys, new_secret, write_secret_file
from .status import StatusError, format_table, printable, query_members

# keys whose values are identifiers: "1234" must stay the string "1234"
STRING_META_KEYS = {"fingerprint", "endpoint", "zone", "host", "model", "vllm"}
INSECURE_HELP = "run without a cluster secret (unauthenticated, unencrypted gossip)"


def _parse_meta_value(text: str):
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    return value if isinstance(value, (str, int, float, bool)) or value is None else text


def parse_meta(pairs: list[str]) -> dict:
    meta = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--meta expects KEY=VALUE, got {pair!r}")
        meta[key] = value if key in STRING_META_KEYS else _parse_meta_value(value)
    return meta


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mesh", description="netloader gossip mesh")
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="run a mesh agent in the foreground until SIGINT/SIGTERM")
    agent.add_argument("--bind", required=True, help="HOST:PORT to listen on (port 0 = any free port)")
    agent.add_argument("--seeds", default=os.environ.get("NETLOADER_MESH_SEEDS", ""),
                       help="comma-separated HOST:PORT of existing members (default $NETLOADER_MESH_SEEDS)")
    agent.add_argument("--name", default=None, help="unique member name (default hostname:port)")
    agent.add_argument("--meta", nargs="*", default=[], metavar="KEY=VALUE",
                       help="metadata to advertise; values are parsed as JSON scalars when possible")
    agent.add_argument("--secret-file", default=os.environ.get("NETLOADER_MESH_SECRET_FILE"),
                       help="cluster secret, made with `mesh keygen` (default $NETLOADER_MESH_SECRET_FILE)")
    agent.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    agent.add_argument("--zone", default=None, help="zone label advertised as meta zone")
    agent.add_argument("--advertise", default=None, help="host (or host:port) others should use to reach us")
    agent.add_argument("--log-level", default="INFO")

    status = sub.add_parser("status", help="print the members known to the mesh")
    status.add_argument("--seeds", default=os.environ.get("NETLOADER_MESH_SEEDS"),
                        help="comma-separated HOST:PORT of agents to ask (default $NETLOADER_MESH_SEEDS)")
    status.add_argument("--json", action="store_true", help="print one JSON array")
    status.add_argument("--watch", action="store_true", help="refresh in place every --interval seconds")
    status.add_argument("--interval", dest="interval_s", type=float, default=1.0)
    status.add_argument("--timeout", dest="timeout_s", type=float, default=3.0,
                        help="give up after this many seconds")
    status.add_argument("--secret-file", default=os.environ.get("NETLOADER_MESH_SECRET_FILE"),
                        help="the cluster secret (default $NETLOADER_MESH_SECRET_FILE)")
    status.add_argument("--insecure", action="store_true", help=INSECURE_HELP)

    keygen = sub.add_parser("keygen", help="write a new random cluster secret (mode 0600)")
    keygen.add_argument("path", nargs="?", help="file to create (default: print the secret)")
    keygen.add_argument("--force", action="store_true", help="replace an existing file")
    return parser


def _require_secret(command: str, args) -> bool:
    """False (after printing the one-line reason) when neither a secret nor --insecure is given."""
    if args.secret_file or args.insecure:
        return True
    print(
        f"mesh {command}: no cluster secret: pass --secret-file PATH or set "
        "$NETLOADER_MESH_SECRET_FILE (make one with `mesh keygen PATH`), "
        "or --insecure for an unauthenticated mesh",
        file=sys.stderr,
    )
    return False


def run_agent(args) -> int:
    if not _require_secret("agent", args):
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        agent = MeshAgent(
            bind=args.bind,
            seeds=parse_seed_list(args.seeds),
            name=args.name,
            meta=parse_meta(args.meta),
            secret_file=args.secret_file,
            zone=args.zone,
            advertise=args.advertise,
            insecure=args.insecure,
        )
        agent.start()
    except (ValueError, OSError) as e:
        print(f"mesh agent: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # zmq.ZMQError for e.g. an address in use
        print(f"mesh agent: cannot start: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"mesh agent {agent.name} listening on {agent.addr}", flush=True)
    while not stop.is_set() and agent.running:
        stop.wait(0.5)
    agent.stop(leave=True)
    return 0


def run_status(args) -> int:
    if not _require_secret("status", args):
        return 2
    try:
        keys = load_cluster_keys(args.secret_file)
    except ValueError as e:
        print(f"mesh status: {e}", file=sys.stderr)
        return 2
    seeds = parse_seed_list(args.seeds)
    if not seeds:
        print("mesh status: no seeds given (--seeds or $NETLOADER_MESH_SEEDS)", file=sys.stderr)
        return 2
    while True:
        try:
            responder, rows = query_members(seeds, keys, timeout_s=args.timeout_s)
        except StatusError as e:
            print(f"mesh status: {e}", file=sys.stderr)
            return 1
        if args.json:
            sys.stdout.write(orjson.dumps(rows).decode() + "\n")
        else:
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J")
            alive = sum(1 for r in rows if r["state"] == "alive")
            sys.stdout.write(f"{len(rows)} members ({alive} alive), view of {printable(responder)}\n")
            sys.stdout.write(format_table(rows) + "\n")
        sys.stdout.flush()
        if not args.watch:
            return 0
        try:
            time.sleep(args.interval_s)
        except KeyboardInterrupt:
            return 0


def run_keygen(args) -> int:
    if args.path is None:
        sys.stdout.write(new_secret().decode())
        return 0
    try:
        write_secret_file(args.path, force=args.force)
    except FileExistsError:
        print(f"mesh keygen: {args.path} exists; pass --force to replace it", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"mesh keygen: cannot write {args.path}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"mesh keygen: wrote a new cluster secret to {args.path} (mode 0600)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "agent":
            return run_agent(args)
        if args.command == "keygen":
            return run_keygen(args)
        return run_status(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
