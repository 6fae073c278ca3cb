"""The audit store: append (with the hash chain), query, stream, verify, prune.

Appending (:mod:`thallus.server.audit.append`) moves the single chain-head row in the same transaction
as the insert (a row lock on PostgreSQL, the write lock on SQLite), so writers on every instance
take turns: ``seq`` is one sequence and each record's ``prev_hash`` is the hash of the record before
it, in commit order. Records already stored (same id) are skipped, which makes replaying a journal
exactly-once.
There is no update and no delete besides :meth:`AuditStore.prune`, which writes a checkpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, func, select, update

from thallus.server.audit.append import Appender, appender_for
from thallus.server.audit.chain import FIELDS, link_hash
from thallus.server.storage import Database
from thallus.server.storage.models import GENESIS_HASH, AuditChainHead, AuditCheckpoint, AuditLog, utcnow

VERIFY_CHUNK = 5000
_HEAD = AuditChainHead.id == 1
_READ_HEAD = select(AuditChainHead.seq, AuditChainHead.hash).where(_HEAD)


@dataclass(frozen=True)
class AuditFilter:
    """The query filters of docs/design.md §11; ``None`` means "any"."""

    user_id: str | None = None
    actions: tuple[str, ...] = ()
    outcome: str | None = None
    correlation_id: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None

    def apply(self, statement: Select[Any]) -> Select[Any]:
        conditions = []
        if self.user_id is not None:
            conditions.append(AuditLog.user_id == self.user_id)
        if self.actions:
            conditions.append(AuditLog.action.in_(self.actions))
        if self.outcome is not None:
            conditions.append(AuditLog.outcome == self.outcome)
        if self.correlation_id is not None:
            conditions.append(AuditLog.correlation_id == self.correlation_id)
        if self.resource_type is not None:
            conditions.append(AuditLog.resource_type == self.resource_type)
        if self.resource_id is not None:
            conditions.append(AuditLog.resource_id == self.resource_id)
        if self.start is not None:
            conditions.append(AuditLog.created_at >= self.start)
        if self.end is not None:
            conditions.append(AuditLog.created_at <= self.end)
        return statement.where(*conditions) if conditions else statement


@dataclass(frozen=True)
class Verification:
    """The outcome of walking the chain: ``ok``, how many records were checked, the first break."""

    ok: bool
    checked: int
    broken_seq: int | None = None
    broken_id: str | None = None
    reason: str | None = None


def row_record(row: AuditLog) -> dict[str, Any]:
    return {name: getattr(row, name) for name in FIELDS}


class AuditStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    def appender(self) -> Appender:
        """An appender that holds its connection between appends (the writer's); ``close`` it after use."""
        return appender_for(self.database)

    async def append(self, records: Sequence[Mapping[str, Any]], *, replay: bool = True) -> int:
        """Store records at the end of the chain, in order; returns how many were new.

        With ``replay`` (the default), records whose id is already stored are skipped — a journal
        replayed after a write whose acknowledgement was lost. A first attempt at fresh records
        (``replay=False``) saves that lookup. One call, one connection: the writer keeps an
        :meth:`appender` instead.
        """
        if not records:
            return 0
        appender = self.appender()
        try:
            return await appender.append(records, replay=replay)
        finally:
            await appender.close()

    async def query(self, filters: AuditFilter, *, limit: int, before_seq: int | None = None) -> list[AuditLog]:
        """Newest first; ``before_seq`` continues after the previous page (keyset pagination)."""
        statement = filters.apply(select(AuditLog))
        if before_seq is not None:
            statement = statement.where(AuditLog.seq < before_seq)
        async with self.database.session() as db:
            return list((await db.scalars(statement.order_by(AuditLog.seq.desc()).limit(limit))).all())

    async def stream(self, filters: AuditFilter, *, chunk: int = 1000) -> AsyncIterator[AuditLog]:
        """Every matching record, oldest first, one page at a time: memory stays constant."""
        after = 0
        while True:
            statement = filters.apply(select(AuditLog)).where(AuditLog.seq > after)
            async with self.database.session() as db:
                page = list((await db.scalars(statement.order_by(AuditLog.seq).limit(chunk))).all())
            for row in page:
                yield row
            if len(page) < chunk:
                return
            after = page[-1].seq

    async def count(self) -> int:
        async with self.database.session() as db:
            return int(await db.scalar(select(func.count()).select_from(AuditLog)) or 0)

    async def verify(self) -> Verification:
        """Walk the chain from the last checkpoint; report the first record whose link is broken."""
        async with self.database.session() as db:
            checkpoint = await db.scalar(select(AuditCheckpoint).order_by(AuditCheckpoint.seq.desc()).limit(1))
            head = (await db.execute(_READ_HEAD)).one()
        expected_seq = (checkpoint.seq if checkpoint else 0) + 1
        previous = checkpoint.hash if checkpoint else GENESIS_HASH
        checked = 0
        while True:
            async with self.database.session() as db:
                page = list(
                    (
                        await db.scalars(
                            select(AuditLog)
                            .where(
                                AuditLog.seq >= expected_seq, AuditLog.seq <= head.seq
                            )  # not what is appended meanwhile
                            .order_by(AuditLog.seq)
                            .limit(VERIFY_CHUNK)
                        )
                    ).all()
                )
            for row in page:
                if row.seq != expected_seq:
                    return Verification(False, checked, expected_seq, None, f"record {expected_seq} is missing")
                if row.prev_hash != previous:
                    return Verification(
                        False, checked, row.seq, row.id, "its prev_hash does not match the record before"
                    )
                if link_hash(previous, row_record(row), row.seq) != row.hash:
                    return Verification(False, checked, row.seq, row.id, "its content does not match its hash")
                previous, expected_seq = row.hash, row.seq + 1
                checked += 1
            if len(page) < VERIFY_CHUNK:
                break
        if int(head.seq) != expected_seq - 1 or str(head.hash) != previous:
            return Verification(False, checked, expected_seq, None, f"records after {expected_seq - 1} are missing")
        return Verification(True, checked)

    async def prune(self, cutoff: datetime) -> int:
        """Delete the oldest records (a prefix of the chain) created before ``cutoff``; checkpoint."""
        async with self.database.session() as db:
            await db.execute(update(AuditChainHead).where(_HEAD).values(updated_at=utcnow()))
            first_kept = await db.scalar(select(func.min(AuditLog.seq)).where(AuditLog.created_at >= cutoff))
            if first_kept is None:
                first_kept = int(await db.scalar(select(AuditChainHead.seq).where(_HEAD)) or 0) + 1
            last_pruned = await db.scalar(
                select(AuditLog).where(AuditLog.seq < first_kept).order_by(AuditLog.seq.desc()).limit(1)
            )
            if last_pruned is None:
                return 0
            count = int(
                await db.scalar(select(func.count()).select_from(AuditLog).where(AuditLog.seq < first_kept)) or 0
            )
            await db.execute(delete(AuditLog).where(AuditLog.seq < first_kept))
            db.add(AuditCheckpoint(seq=last_pruned.seq, hash=last_pruned.hash, pruned_count=count, created_at=utcnow()))
            await db.commit()
            return count
