"""A file-based stand-in for the gossip table: one JSON row per instance in a directory.

Each instance rewrites only its own row (atomically); readers see every row. This is
what `MeshAgent.members()` meta gives a real instance, minus the gossip delay.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path


class FileTable:
    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, row: dict) -> None:
        path = self.dir / f"{name}.row.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**row, "name": name}))
        os.replace(tmp, path)

    def read(self) -> list[dict]:
        rows = []
        for path in sorted(self.dir.glob("*.row.json")):
            try:
                row = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced, or garbage: skip
            if isinstance(row, dict):
                rows.append(row)
        return rows


class RowPublisher:
    """Rewrite this instance's row every `interval_s` from `make_row()` until stopped."""

    def __init__(self, table: FileTable, name: str, make_row: Callable[[], dict], interval_s=0.02):
        self.table, self.name, self.make_row, self.interval_s = table, name, make_row, interval_s
        self._stop = threading.Event()
        self._last: dict | None = None
        self._thread = threading.Thread(target=self._run, name=f"row-{name}", daemon=True)

    def start(self) -> RowPublisher:
        self.publish()
        self._thread.start()
        return self

    def publish(self) -> None:
        row = self.make_row()
        if row != self._last:
            self.table.write(self.name, row)
            self._last = row

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.publish()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
