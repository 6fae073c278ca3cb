"""The audit writer: an :class:`~thallus.audit.AuditSink` that never blocks or fails a request.

``record`` only prepares the event (an idempotent id, secrets redacted, lengths bounded, and the part
of its hash that needs no place in the chain: :class:`~thallus.server.audit.chain.Prepared`) and puts it on
a bounded in-memory queue. One background task drains the queue in batches into the store, through
an appender that keeps its connection between batches (:mod:`thallus.server.audit.append`); a batch starts
at most every ``linger`` seconds, so a record after a quiet spell is written at once and a busy
server's records share one transaction. All of this runs on the loop that serves requests, which is
why each step is kept short (benchmarks/README.md, ``bench_audit.py``). When
the database is unreachable or slower than ``write_timeout``, batches spill to this process's
journal file (fsync'd per batch); once the database answers again, the journal — and any journal a
stopped or crashed process left behind — is replayed in order, exactly once (records whose id is
already stored are skipped), before new records are written. A full queue spills to the journal
instead of dropping. ``stop`` (the application's lifespan shutdown) flushes everything.

Sinks in front of the writer that hold events back (:class:`~thallus.server.audit.coalesce.CoalescingSink`)
are registered with :meth:`AuditWriter.add_source`: each turn of the background task (at least once
per ``retry_interval`` when idle) lets them hand on what is due, and ``flush`` and ``stop`` make them
hand on everything first, so nothing they hold is lost at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio.to_thread

from thallus.audit import AuditEvent
from thallus.correlation import uuid7
from thallus.errors import redact
from thallus.server.audit.append import Appender, Linkable
from thallus.server.audit.bounds import bound_record
from thallus.server.audit.chain import Prepared, canonical_halves, normalise, timestamp
from thallus.server.audit.journal import PATTERN, Journal, orphans, read_records
from thallus.server.audit.store import AuditStore
from thallus.server.storage.database import is_unavailable

logger = logging.getLogger("thallus.audit")

ERROR_LOG_INTERVAL = 60.0
_WAKE_UP = Prepared({}, ("", ""))  # queued by stop() so the task notices at once


class HoldsEvents(Protocol):
    """A sink in front of the writer that holds events back for a while (module doc)."""

    def flush_due(self) -> int:
        """Hand on what is due now; returns how many records were handed on."""

    def flush(self) -> int:
        """Hand on everything held; returns how many records were handed on."""


def prepare(event: AuditEvent) -> dict[str, Any]:
    """A JSON-safe record with its idempotency id; secrets in ``details`` are redacted, the whole
    :func:`~thallus.server.audit.chain.normalised` (stored as it is hashed), then every text in it bounded
    (:mod:`thallus.server.audit.bounds`) — the one place, so journal and store hold the same text."""
    record: dict[str, Any] = {
        "id": uuid7(),
        "action": event.action,
        "user_id": event.user_id,
        "outcome": event.outcome,
        "resource_type": event.resource_type,
        "resource_id": event.resource_id,
        "correlation_id": event.correlation_id,
        "details": json_safe(redact(event.details)) if event.details is not None else None,
        "error_message": event.error_message,
        "ip_address": event.ip_address,
        "user_agent": event.user_agent,
        "method": event.method,
        "path": event.path,
        "status_code": event.status_code,
        "duration_ms": event.duration_ms,
        "created_at": timestamp(event.created_at),
    }
    return bound_record(normalise(record))


_SCALARS = frozenset({str, int, float, bool, type(None)})


def json_safe(value: Any) -> Any:
    """``value`` as JSON gives it back (``json.loads(json.dumps(value, default=str))``): a copy the
    caller cannot change later. The usual flat ``details`` (string keys, scalar values) skip the
    round trip; ``redact`` has copied that dict already."""
    if type(value) is dict and all(type(key) is str and type(item) in _SCALARS for key, item in value.items()):
        return value
    return json.loads(json.dumps(value, default=str))


class AuditWriter:
    """Queue → batches → store, with the journal as the fallback (module doc)."""

    def __init__(
        self,
        store: AuditStore,
        journal_dir: Path,
        *,
        queue_size: int = 10_000,
        batch_size: int = 500,
        write_timeout: float = 5.0,
        retry_interval: float = 1.0,
        linger: float = 0.05,
    ) -> None:
        self.store = store
        self.journal_dir = journal_dir
        self.journal = Journal(journal_dir)
        self.batch_size = batch_size
        self.write_timeout = write_timeout
        self.retry_interval = retry_interval
        self.linger = linger
        self._queue: asyncio.Queue[Prepared] = asyncio.Queue(queue_size)
        self._journal_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._appender: Appender | None = None  # holds its connection between batches
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._outstanding = 0  # queued records not yet stored or journalled
        self._last_retry = -math.inf
        self._last_batch = -math.inf  # when the last batch was taken off the queue
        self._last_error_log = -math.inf
        self._last_orphan_scan = -math.inf
        self._orphans_seen = False
        self._sources: list[HoldsEvents] = []
        #: records written, spilled (store away or slow), replayed, spilled by a full queue; batches
        #: written — counts that only grow (the metrics read them: thallus.server.metrics)
        self.stats = {"written": 0, "spilled": 0, "replayed": 0, "overflowed": 0, "batches": 0}
        self.head_seq = 0  # the chain head's seq after this writer's last append (0 before the first)

    @property
    def queue_depth(self) -> int:
        """Records waiting in the in-memory queue."""
        return self._queue.qsize()

    # -- the sink -------------------------------------------------------------------------------

    def record(self, event: AuditEvent) -> None:
        try:
            record = prepare(event)
            prepared = Prepared(record, canonical_halves(record))  # the linking work that needs no seq
        except Exception:  # never fail the request over an audit record
            logger.exception("could not prepare audit event %s", event.action)
            return
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and running is not loop:
            loop.call_soon_threadsafe(self._enqueue, prepared)  # from a worker thread
        else:
            self._enqueue(prepared)

    def _enqueue(self, record: Prepared) -> None:
        try:
            self._queue.put_nowait(record)
            self._outstanding += 1
        except asyncio.QueueFull:
            self.stats["overflowed"] += 1
            self._append_to_journal([record], sync=False)  # spill rather than drop; fsync'd with the next batch
            self._log_error("audit queue full; spilling to the journal")

    def add_source(self, source: HoldsEvents) -> None:
        """Drive ``source``, a sink that holds events back before handing them to this writer: its
        due records are released on each turn of the background task, all of them by ``flush`` and
        ``stop``."""
        self._sources.append(source)

    def _release(self, *, everything: bool) -> None:
        for source in self._sources:
            try:
                if everything:
                    source.flush()
                else:
                    source.flush_due()
            except Exception:  # a source's problem must not stop the writer
                logger.exception("could not release held audit records")

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._stop_requested = asyncio.Event()
        self._appender = self.store.appender()
        self._task = asyncio.create_task(self._run(), name="thallus-audit-writer")

    async def stop(self, timeout: float = 30.0) -> None:
        """Write (or journal) everything queued — held-back records first released — then close the
        journal."""
        self._release(everything=True)
        self._stopping = True
        self._stop_requested.set()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_WAKE_UP)  # a full queue keeps the task busy anyway
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                logger.error("audit writer did not finish in %s s; journalling the rest", timeout)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        rest = self._drain()
        if rest:
            self._append_to_journal(rest, sync=True)
        with self._journal_lock:
            self.journal.close()
        if self._appender is not None:
            appender, self._appender = self._appender, None
            try:
                await appender.close()
            except Exception as exc:  # everything is stored or journalled already
                logger.warning("could not close the audit appender: %s", exc)

    async def flush(self) -> None:
        """Release every held-back record, then wait until every record queued so far is stored or
        journalled (tests, CLI)."""
        self._release(everything=True)
        while self._outstanding > 0:
            await asyncio.sleep(0.005)

    # -- the background task -------------------------------------------------------------------

    async def _run(self) -> None:
        await self._retry_journals(force=True)
        while not (self._stopping and self._queue.empty()):
            self._release(everything=False)
            batch = await self._next_batch()
            try:
                if batch:
                    await self._write(batch)
                elif self.journal.pending() or self._orphans_waiting():
                    await self._retry_journals()
            except Exception:  # the writer must survive anything; the batch is journalled
                logger.exception("audit writer failed; journalling the batch")
                if batch:
                    self._append_to_journal(batch, sync=True)
            finally:
                self._outstanding -= len(batch)

    async def _next_batch(self) -> list[Prepared]:
        try:
            async with asyncio.timeout(0.05 if self._stopping else self.retry_interval):
                first = await self._queue.get()
        except TimeoutError:
            return []
        batch = [first]
        self._take_queued(batch)
        wait = self._last_batch + self.linger - time.monotonic()
        if wait > 0 and len(batch) < self.batch_size and not self._stopping:
            # Appends start at most every ``linger`` seconds: a record after a quiet spell is written
            # at once, a busy server's records share a transaction (benchmarks/README.md, bench_audit).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._stop_requested.wait()  # stop() cuts the wait short
            self._take_queued(batch)
        self._last_batch = time.monotonic()
        return [record for record in batch if record is not _WAKE_UP]

    def _take_queued(self, batch: list[Prepared]) -> None:
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    def _drain(self) -> list[Prepared]:
        rest: list[Prepared] = []
        while True:
            try:
                record = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return rest
            if record is not _WAKE_UP:
                rest.append(record)

    async def _write(self, batch: list[Prepared]) -> None:
        if self.journal.pending():  # this process's spilled records go first, in order
            if not await self._retry_journals(force=True):
                await self._spill(batch)
                return
        elif self._orphans_waiting():  # best effort; other processes' leftovers do not gate new records
            await self._retry_journals(force=True)
        if await self._store(batch, replay=False):
            self.stats["written"] += len(batch)
            self.stats["batches"] += 1
        else:
            await self._spill(batch)

    async def _store(self, records: Sequence[Linkable], *, replay: bool = True) -> bool:
        """Append to the store within the timeout; ``False`` when the database is away or slow."""
        appender = self._appender
        if appender is None:
            raise RuntimeError("the audit writer is not started")
        try:
            async with asyncio.timeout(self.write_timeout):
                await appender.append(records, replay=replay)
        except TimeoutError:
            self._log_error(f"audit store slower than {self.write_timeout} s; journalling")
            return False
        except Exception as exc:
            if is_unavailable(exc) or isinstance(exc, OSError):
                self._log_error(f"audit store unreachable ({type(exc).__name__}); journalling")
                return False
            raise
        self.head_seq = appender.head_seq
        return True

    async def _spill(self, batch: list[Prepared]) -> None:
        await anyio.to_thread.run_sync(self._append_to_journal, batch, True)
        self.stats["spilled"] += len(batch)

    def _append_to_journal(self, records: list[Prepared], sync: bool) -> None:
        with self._journal_lock:
            self.journal.append((prepared.record for prepared in records), sync=sync)

    def _orphans_waiting(self) -> bool:
        """Whether another journal holds records (checked at most once per ``retry_interval``)."""
        now = time.monotonic()
        if now - self._last_orphan_scan >= self.retry_interval:
            self._last_orphan_scan = now
            self._orphans_seen = any(
                path != self.journal.path and path.stat().st_size > 0 for path in self.journal_dir.glob(PATTERN)
            )
        return self._orphans_seen

    async def _retry_journals(self, *, force: bool = False) -> bool:
        """Replay orphaned journals, then this process's own, in order; ``True`` when all are stored."""
        now = time.monotonic()
        if not force and now - self._last_retry < self.retry_interval:
            return False
        self._last_retry = now
        with orphans(self.journal_dir, own=self.journal.path) as files:
            for path in files:
                records = await anyio.to_thread.run_sync(read_records, path)
                if not await self._replay(records):
                    return False
                path.unlink(missing_ok=True)
                logger.info("replayed %d audit records from %s", len(records), path.name)
        with self._journal_lock:
            own = self.journal.read()
        if own:
            if not await self._replay(own):
                return False
            with self._journal_lock:
                self.journal.clear()
            logger.info("replayed %d journalled audit records", len(own))
        return True

    async def _replay(self, records: list[dict[str, Any]]) -> bool:
        for start in range(0, len(records), self.batch_size):
            chunk = records[start : start + self.batch_size]
            if not await self._store(chunk):
                return False
            self.stats["replayed"] += len(chunk)
        return True

    def _log_error(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL:
            self._last_error_log = now
            logger.error(message)
