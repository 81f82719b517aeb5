"""Work that AWS does behind a request, off the request's path: items are grouped in memory and handed
to `send` by one daemon thread, every `interval` seconds or as soon as a group is full. A request
only appends to a list; an unreachable moto costs a warning in the log, never a request. What could
not be sent is kept for the next turn, up to `max_pending` items, the oldest dropped beyond that (as
SageMaker's data capture stops capturing rather than slow an endpoint down)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger("standin")


class BackgroundBatcher:
    def __init__(
        self,
        name: str,
        send: Callable[[Any, list], None],
        interval: float = 2.0,
        max_items: int = 500,
        max_pending: int = 20_000,
    ) -> None:
        self.name, self.send = name, send
        self.interval, self.max_items, self.max_pending = interval, max_items, max_pending
        self.pending: dict[Hashable, list] = {}
        self.count = 0
        self.dropped = 0
        self.failing = False
        self.lock = threading.Lock()
        self.sending = threading.Lock()  # one flush at a time: the thread's, or stop()'s
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=name)
        self.thread.start()

    def add(self, key: Hashable, item: Any) -> None:
        with self.lock:
            group = self.pending.setdefault(key, [])
            group.append(item)
            self.count += 1
            self._bound()
            full = len(group) >= self.max_items
        if full:
            self.wake.set()

    def _bound(self) -> None:
        """Drop the oldest items beyond max_pending (caller holds the lock)."""
        while self.count > self.max_pending:
            key = next(iter(self.pending))
            group = self.pending[key]
            excess = min(len(group), self.count - self.max_pending)
            del group[:excess]
            if not group:
                del self.pending[key]
            self.count -= excess
            self.dropped += excess

    def flush(self) -> None:
        """Send every group now; a group that fails goes back to be sent on the next turn."""
        with self.sending:
            with self.lock:
                pending, self.pending, self.count = self.pending, {}, 0
            failed: dict[Hashable, list] = {}
            error: Exception | None = None
            for key, items in pending.items():
                for start in range(0, len(items), self.max_items):
                    chunk = items[start : start + self.max_items]
                    try:
                        self.send(key, chunk)
                    except Exception as exc:  # moto unreachable: kept for the next turn, serving goes on
                        failed.setdefault(key, []).extend(chunk)
                        error = exc
            self._keep(failed, error)

    def _keep(self, failed: dict[Hashable, list], error: Exception | None) -> None:
        with self.lock:
            for key, items in failed.items():
                # The failed items are older than any that came meanwhile: they go first.
                self.pending[key] = items + self.pending.get(key, [])
                self.count += len(items)
            self._bound()
            dropped, self.dropped = self.dropped, 0
        if error is not None and not self.failing:
            log.warning("%s: could not send, will retry: %s", self.name, error)
        if dropped:
            log.warning("%s: %d items dropped (more than %d waiting)", self.name, dropped, self.max_pending)
        self.failing = error is not None

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=5)
        if not self.thread.is_alive():  # else it is stuck on an unreachable moto: leave it be
            self.flush()

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(self.interval)
            self.wake.clear()
            self.flush()
