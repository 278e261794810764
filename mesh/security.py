"""Cluster secret -> CURVE keys, and helpers that put a ZeroMQ socket under them.

Every holder of the secret file derives the same CURVE keypair. Servers accept a
client only if it presents that public key (checked by a ZAP handler), and clients
only talk to servers holding the matching secret key, so an agent without the secret
can neither join nor read traffic. Without a secret the mesh is open.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)

_KEY_DERIVATION_LABEL = b"netloader-mesh/curve-keypair/v1\x00"
MAX_SECRET_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class ClusterKeys:
    public: bytes  # z85, 40 bytes
    secret: bytes  # z85, 40 bytes

    def __repr__(self) -> str:  # never print the secret key into logs
        return f"ClusterKeys(public={self.public.decode()!r})"


def derive_cluster_keys(secret: bytes) -> ClusterKeys:
    """The CURVE keypair every holder of `secret` derives identically."""
    if not secret:
        raise ValueError("empty cluster secret")
    seed = hashlib.sha256(_KEY_DERIVATION_LABEL + secret).digest()
    secret_z85 = z85.encode(seed)
    return ClusterKeys(public=zmq.curve_public(secret_z85), secret=secret_z85)


def load_cluster_keys(secret_file: str | None) -> ClusterKeys | None:
    """Keys derived from the secret file; None (open mesh) when no file is configured.

    Raises ValueError naming the path when the file is missing, unreadable or empty.
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
    return derive_cluster_keys(content)


class _AllowedClientKeys:
    """ZAP credentials provider: accept only the registered cluster public keys."""

    def __init__(self) -> None:
        self._keys: set[bytes] = set()
        self._lock = threading.Lock()

    def add(self, public_z85: bytes) -> None:
        with self._lock:
            self._keys.add(bytes(public_z85))

    def callback(self, domain: str, client_key_z85: bytes) -> bool:
        with self._lock:
            allowed = bytes(client_key_z85) in self._keys
        if not allowed:
            log.debug("rejected CURVE client key %r", client_key_z85)
        return allowed


class _ContextAuth:
    def __init__(self, context: zmq.Context) -> None:
        self.allowed = _AllowedClientKeys()
        self.authenticator = ThreadAuthenticator(context, log=logging.getLogger("zmq.auth"))
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
