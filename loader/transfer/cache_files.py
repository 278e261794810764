"""Compile cache entries on disk: the listing a source offers, the range reads it serves,
and the client's atomic installation of what it received.

A listing names files relative to the cache root (vLLM's VLLM_CACHE_ROOT), each with its
size and keyed BLAKE3 checksum (the key of loader.transfer.checksum: derived from the
cluster secret, never sent). The source reads the files again when asked for a range,
so an entry that changed on disk since it was listed is caught by the client's checksum.

The client writes every file into a temporary directory beside the cache, verifies it
there, and only then moves it into place: a whole entry directory with one rename when
the cache has none yet, otherwise file by file with a hard link, which never replaces a
file that exists (an existing local entry is never overwritten). Compile caches are
content-addressed (inductor, Triton) or per rank (vLLM's artifact), so adding missing
files to an entry that exists is safe.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass

import blake3

from loader.transfer.cache_wire import CACHE_DIR, CacheFile, check_path
from loader.transfer.protocol import ProtocolError

log = logging.getLogger(__name__)

_TMP_PREFIX = ".netloader-incoming-"
_STALE_TMP_S = 3600.0  # an installation left behind by a process that died


class CacheTooLarge(ValueError):
    pass


def list_entry(
    root: str, entry_dirs: list[str], skip_dirs: set[str], key: bytes, max_bytes: int
) -> tuple[CacheFile, ...]:
    """Every regular file under the `entry_dirs` (relative to `root`), except those under
    `skip_dirs` (e.g. other ranks' artifacts), with its size and keyed checksum. Files whose
    names cannot travel (see cache_wire.check_path) are left out. CacheTooLarge above
    `max_bytes` in all."""
    files: list[CacheFile] = []
    total = 0
    for entry in entry_dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, entry)):
            rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            dirnames[:] = sorted(d for d in dirnames if f"{rel_dir}/{d}" not in skip_dirs)
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                if os.path.islink(full) or not os.path.isfile(full):
                    continue
                path = f"{rel_dir}/{name}"
                try:
                    check_path(path)
                except ProtocolError:
                    log.debug("compile cache: %s cannot be offered (its name)", path)
                    continue
                with open(full, "rb") as fh:
                    data = fh.read()
                total += len(data)
                if total > max_bytes:
                    raise CacheTooLarge(f"entry exceeds {max_bytes >> 20} MiB")
                files.append(CacheFile(path, len(data), file_digest(data, key)))
    return tuple(files)


def file_digest(data: bytes, key: bytes) -> str:
    return blake3.blake3(data, key=key).hexdigest()


def read_range(root: str, file: CacheFile, offset: int, length: int) -> bytes:
    """Up to `length` bytes of a listed file from `offset` (never beyond its listed size)."""
    length = max(0, min(length, file.size - offset))
    with open(os.path.join(root, *file.path.split("/")), "rb") as fh:
        fh.seek(offset)
        return fh.read(length)


@dataclass
class InstallReport:
    installed: int  # files moved into the cache
    kept: int  # files the cache held already (left as they were)


class Installation:
    """One fetched entry, staged beside the cache until every file is verified."""

    def __init__(self, root: str, key: bytes) -> None:
        self._root = root
        self._key = key
        cache = os.path.join(root, CACHE_DIR)
        os.makedirs(cache, exist_ok=True)
        _remove_stale(cache)
        self._tmp = os.path.join(cache, _TMP_PREFIX + secrets.token_hex(8))
        os.mkdir(self._tmp, 0o700)
        self._open: tuple[CacheFile, object, object] | None = None  # file, handle, hasher
        self._written = 0

    def begin(self, file: CacheFile) -> None:
        self._close_open()
        path = self._staged(file.path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._open = (file, open(path, "wb"), blake3.blake3(key=self._key))
        self._written = 0

    def write(self, offset: int, data: bytes) -> None:
        file, handle, hasher = self._current()
        if offset != self._written or self._written + len(data) > file.size:
            raise ProtocolError(f"{file.path}: data at {offset}, expected {self._written}")
        handle.write(data)
        hasher.update(data)
        self._written += len(data)

    def end(self) -> None:
        """Close the current file; ValueError naming it unless it is complete and its
        checksum is the listed one."""
        file, _, hasher = self._current()
        self._close_open()
        if self._written != file.size:
            raise ValueError(f"{file.path}: {self._written} of {file.size} bytes")
        if hasher.hexdigest() != file.digest:
            raise ValueError(f"checksum mismatch in {file.path}")

    def commit(self, entry_dirs: list[str]) -> InstallReport:
        """Move every verified file into the cache (see the module docstring)."""
        report = InstallReport(0, 0)
        for entry in entry_dirs:
            staged, final = self._staged(entry), os.path.join(self._root, *entry.split("/"))
            if not os.path.isdir(staged):
                continue
            count = sum(len(names) for _, _, names in os.walk(staged))
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                if os.path.exists(final) and os.listdir(final):
                    raise FileExistsError(final)
                os.rename(staged, final)  # the whole entry appears at once
                report.installed += count
            except OSError:
                self._merge(staged, final, report)
        self.discard()
        return report

    def discard(self) -> None:
        self._close_open()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _merge(self, staged: str, final: str, report: InstallReport) -> None:
        for dirpath, _, names in os.walk(staged):
            target_dir = os.path.join(final, os.path.relpath(dirpath, staged))
            os.makedirs(target_dir, exist_ok=True)
            for name in names:
                try:
                    os.link(os.path.join(dirpath, name), os.path.join(target_dir, name))
                    report.installed += 1
                except FileExistsError:
                    report.kept += 1

    def _staged(self, path: str) -> str:
        return os.path.join(self._tmp, *path.split("/"))

    def _current(self):
        if self._open is None:
            raise ProtocolError("data for no file")
        return self._open

    def _close_open(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


def _remove_stale(cache: str) -> None:
    now = time.time()
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        try:
            if name.startswith(_TMP_PREFIX) and now - os.stat(path).st_mtime > _STALE_TMP_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass
