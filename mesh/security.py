"""Cluster secret -> CURVE keys, and helpers that put a ZeroMQ socket under them.

Every holder of the secret file derives the same CURVE keypair (scrypt, memory-hard, so
a captured handshake gives no fast offline guessing of a weak passphrase). Servers
accept a client only if it presents that public key (checked by a ZAP handler, which
logs rejected keys at WARNING, rate-limited), and clients only talk to servers holding
the matching secret key, so an agent without the secret can neither join nor read
traffic. `mesh keygen` writes a random secret (`write_secret_file`). Without a secret
there is no authentication: callers must opt in to that explicitly.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
import secrets
import threading
import time
import weakref
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)

# scrypt salt: fixed (every holder must derive the same keypair) and versioned
_KEY_DERIVATION_LABEL = b"netloader-mesh/curve-keypair/scrypt/v2"
# 32 MiB and ~0.1 s per derivation here; done once per process and secret (cached)
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
_SCRYPT_MAXMEM = 64 << 20
MAX_SECRET_FILE_BYTES = 1 << 20
MIN_SECRET_BYTES = 16
KEYGEN_BYTES = 32


@dataclass(frozen=True)
class ClusterKeys:
    public: bytes  # z85, 40 bytes
    secret: bytes  # z85, 40 bytes

    def __repr__(self) -> str:  # never print the secret key into logs
        return f"ClusterKeys(public={self.public.decode()!r})"


def derive_cluster_keys(secret: bytes) -> ClusterKeys:
    """The CURVE keypair every holder of `secret` derives identically (scrypt; cached)."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"cluster secret of {len(secret)} bytes is too short (at least {MIN_SECRET_BYTES})"
        )
    return _derive(bytes(secret))


@functools.lru_cache(maxsize=8)
def _derive(secret: bytes) -> ClusterKeys:
    seed = hashlib.scrypt(
        secret,
        salt=_KEY_DERIVATION_LABEL,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=_SCRYPT_MAXMEM,
        dklen=32,
    )
    secret_z85 = z85.encode(seed)
    return ClusterKeys(public=zmq.curve_public(secret_z85), secret=secret_z85)


def new_secret() -> bytes:
    """A new random cluster secret as one line of text: 32 random bytes, base64."""
    return base64.b64encode(secrets.token_bytes(KEYGEN_BYTES)) + b"\n"


def write_secret_file(path: str, force: bool = False) -> None:
    """Write a new random secret to `path`, mode 0600. An existing file is an error
    (FileExistsError) unless `force`, which replaces it atomically."""
    secret = new_secret()
    target = path
    if force:
        directory = os.path.dirname(os.path.abspath(path))
        target = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, secret)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
    if force:
        os.replace(target, path)


def load_cluster_keys(secret_file: str | None) -> ClusterKeys | None:
    """Keys derived from the secret file; None (no authentication) when no file is given.

    Raises ValueError naming the path when the file is missing, unreadable, empty or
    shorter than MIN_SECRET_BYTES.
    Surrounding whitespace is ignored so a trailing newline does not change the key.
    """
    if secret_file is None or secret_file == "":
        return None
    try:
        with open(secret_file, "rb") as f:
            content = f.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"secret file {secret_file!r} cannot be read: {e.strerror or e}") from e
    if len(content) > MAX_SECRET_FILE_BYTES:
        raise ValueError(f"secret file {secret_file!r} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    content = content.strip()
    if not content:
        raise ValueError(f"secret file {secret_file!r} is empty")
    if len(content) < MIN_SECRET_BYTES:
        raise ValueError(
            f"secret file {secret_file!r} holds {len(content)} bytes: a cluster secret needs "
            f"at least {MIN_SECRET_BYTES}; make a random one with `mesh keygen PATH`"
        )
    return derive_cluster_keys(content)


class RejectionLog:
    """WARNING for the first rejection of each client key (up to `max_keys` keys), then
    at most one summary line per `interval_s` counting the rejections not logged."""

    def __init__(self, clock=time.monotonic, interval_s: float = 60.0, max_keys: int = 64):
        self._clock = clock
        self._interval_s = interval_s
        self._max_keys = max_keys
        self._seen: set[bytes] = set()
        self._unlogged = 0
        self._window_start: float | None = None
        self._lock = threading.Lock()

    def rejected(self, client_key_z85: bytes) -> None:
        key = bytes(client_key_z85)
        now = self._clock()
        with self._lock:
            if self._window_start is None:
                self._window_start = now
            if key not in self._seen and len(self._seen) < self._max_keys:
                self._seen.add(key)
                first = True
            else:
                first = False
                self._unlogged += 1
                if now - self._window_start < self._interval_s:
                    return
                count, self._unlogged, self._window_start = self._unlogged, 0, now
        if first:
            log.warning(
                "rejected a connection presenting CURVE key %s: not the cluster key "
                "(the peer knows the cluster's public key but not its secret)",
                key.decode(errors="replace"),
            )
        else:
            log.warning(
                "rejected %d more connection(s) presenting keys that are not the cluster key "
                "since the last report (%d distinct keys logged so far)",
                count,
                len(self._seen),
            )


class _AllowedClientKeys:
    """ZAP credentials provider: accept only the registered cluster public keys."""

    def __init__(self) -> None:
        self._keys: set[bytes] = set()
        self._lock = threading.Lock()
        self.rejections = RejectionLog()

    def add(self, public_z85: bytes) -> None:
        with self._lock:
            self._keys.add(bytes(public_z85))

    def callback(self, domain: str, client_key_z85: bytes) -> bool:
        with self._lock:
            allowed = bytes(client_key_z85) in self._keys
        if not allowed:
            self.rejections.rejected(client_key_z85)
        return allowed


class _ContextAuth:
    def __init__(self, context: zmq.Context) -> None:
        self.allowed = _AllowedClientKeys()
        self.authenticator = ThreadAuthenticator(context)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(domain="*", credentials_provider=self.allowed)


_auth_by_context: weakref.WeakKeyDictionary[zmq.Context, _ContextAuth] = weakref.WeakKeyDictionary()
_auth_lock = threading.Lock()


def _context_auth(context: zmq.Context) -> _ContextAuth:
    with _auth_lock:
        auth = _auth_by_context.get(context)
        if auth is None:
            auth = _ContextAuth(context)
            _auth_by_context[context] = auth
        return auth


def secure_server(sock: zmq.Socket, keys: ClusterKeys | None) -> None:
    """Make `sock` a CURVE server accepting only clients holding the cluster key.

    Must be called before bind(). Starts one ZAP authenticator per context (reused).
    No-op when keys is None.
    """
    if keys is None:
        return
    _context_auth(sock.context).allowed.add(keys.public)
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: ClusterKeys | None) -> None:
    """Make `sock` a CURVE client presenting the cluster key and expecting a cluster server.

    Must be called before connect(). No-op when keys is None.
    """
    if keys is None:
        return
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = keys.public


def release_context(context: zmq.Context) -> None:
    """Stop the ZAP authenticator of `context`, if any; call before context.term().

    The authenticator owns sockets in the context, so term() would block while it runs.
    """
    with _auth_lock:
        auth = _auth_by_context.pop(context, None)
    if auth is not None:
        auth.authenticator.stop()


def close_context(context: zmq.Context) -> None:
    """End `context` and its authenticator. A socket an error path left open is closed
    here, not waited for: term() would block on it for good."""
    release_context(context)
    context.destroy(linger=0)
