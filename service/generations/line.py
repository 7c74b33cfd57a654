"""The line: which generations go to Deep-Image, and when.

Deep-Image limits how many jobs one account may have processing at once and answers `429`
beyond that. genrelay keeps its own jobs under that limit, so a catalog waits here, in order,
instead of being refused upstream:

- A generation is *waiting* while it is `queued` without `admitted_at`. An *admission* gives it
  one of the account's slots (sets `admitted_at`) and queues its `submit` task. It holds the
  slot until Deep-Image is done with its job from genrelay's point of view: the result is
  known (callback or poll), or the generation ends (failed, timed out, canceled before its job
  was created). A generation canceled while its job runs keeps the slot until Deep-Image has
  finished that job (it has no cancel), so the next submission is not refused. The slots in
  use are counted from the database (`IN_FLIGHT`), so every process agrees and a crash loses
  none: a slot belongs to a generation's row, not to a process.
- Admissions run one at a time: each takes the lock on the account's `upstream_accounts` row
  (`SELECT ... FOR UPDATE` on PostgreSQL; on SQLite every write transaction is exclusive
  already), counts the slots in use and hands out the free ones. They run at intake (the new
  generation goes on at once when a slot is free), in every transaction that frees a slot
  (`slot_freed` asks for one; `Store` runs it just before the commit), and every second in the
  `line` task, which also cancels generations whose deadline passed while they waited.
- Free slots go to the waiting tenants by weighted fair share (`choose`): the tenant that
  holds the fewest slots for its weight goes next, so one tenant's single request is never
  behind another's ten thousand. Every waiting tenant's first slot comes before anyone's share
  by weight (one holding none goes before one holding any, whatever the weights); beyond that,
  the weights divide the slots in proportion: weights 10 and 1 hold 1 and 1 of 2 slots, 4 and
  1 of 5, 10:1 from 11 on. Within a tenant: higher `priority` first, then oldest first.
- The limit is `GENRELAY_UPSTREAM_CONCURRENCY` when set. Otherwise it is learned: it starts at
  INITIAL_LIMIT and grows by one for every job accepted while all slots are in use (slow
  start); a 429 that states the limit ("Your rate limit is N") sets it to N; one that does not
  halves it, after which it grows by one per `limit` jobs accepted at the limit.
- A 429 is never a failed attempt: the generation hands its slot back and waits again, in its
  old place. When genrelay's own count does not explain the 429 (someone else uses the
  account, or a canceled job still runs upstream), admissions also pause for a moment, doubling
  while 429s keep coming.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.database import Store
from service.domain import ErrorCode, GenerationStatus
from service.models import Generation, Task, Tenant, UpstreamAccount, utcnow
from service.runtime.kinds import LINE, SUBMIT
from service.runtime.outcomes import Later
from service.runtime.queue import ClaimedTask, TaskQueue, TaskStatus

log = logging.getLogger("genrelay.line")

ACCOUNT = "deepimage"
LINE_TASK_ID = "task_line"
INITIAL_LIMIT = 2
PAUSE_FIRST = 0.5  # seconds without admissions after an unexplained 429, doubling...
PAUSE_MAX = 30.0  # ...up to this
TICK_BUSY = 1.0  # seconds between `line` runs while generations wait or hold slots
TICK_IDLE = 5.0  # ...and while none does (`_wake` ends the sleep when one starts waiting)
# A pass takes milliseconds: its lease is short (SHORT_LEASES in service/runtime/kinds.py), so a
# worker killed during one delays the next pass only seconds. Two passes at once are harmless:
# admissions take the account's row lock, and deadline cancels skip rows another transaction
# holds.
MAX_TENANTS_PER_PASS = 500  # waiting tenants under their cap one admission considers
DEADLINE_BATCH = 200


def _status(status: GenerationStatus) -> sa.ColumnElement[str]:
    """A status written into the statement's text, not bound: a prepared statement's generic
    plan (PostgreSQL, after a few runs) and SQLite can use a partial index only when the
    query's condition shows the index's own constants."""
    return sa.literal_column(f"'{status.value}'")


# The conditions of the partial indexes of service/models.py (IN_FLIGHT_SQL), as expressions.
IN_FLIGHT = sa.and_(
    Generation.admitted_at.is_not(None),
    Generation.source_found_at.is_(None),
    sa.or_(
        Generation.status.in_(
            [_status(GenerationStatus.QUEUED), _status(GenerationStatus.PROCESSING)]
        ),
        sa.and_(
            Generation.status == _status(GenerationStatus.CANCELED),
            Generation.upstream_job.is_not(None),
        ),
    ),
)
WAITING = sa.and_(
    Generation.status == _status(GenerationStatus.QUEUED), Generation.admitted_at.is_(None)
)

_ADMIT = "genrelay_admit"

# The intake's statements, built once (each new statement object costs a cache key).
_ACCOUNTS = cast(sa.Table, UpstreamAccount.__table__)
_LOCK_ACCOUNT = (
    sa.select(_ACCOUNTS.c.concurrency_limit, _ACCOUNTS.c.limit_source, _ACCOUNTS.c.paused_until)
    .where(_ACCOUNTS.c.id == ACCOUNT)
    .with_for_update()
)
_ACCOUNT_LEARNING = sa.select(_ACCOUNTS.c.limit_source, _ACCOUNTS.c.refusals_in_a_row).where(
    _ACCOUNTS.c.id == ACCOUNT
)
# Counted only as far as decides: `limit` slots in use, any generation waiting.
_ALONE = sa.select(
    sa.select(sa.func.count())
    .select_from(sa.select(Generation.id).where(IN_FLIGHT).limit(sa.bindparam("limit")).subquery())
    .scalar_subquery(),
    sa.exists().where(WAITING),
    Tenant.max_in_flight,
).where(Tenant.id == sa.bindparam("tenant_id"))


def slot_freed(session: Session) -> None:
    """Ask for an admission pass just before `session` commits (it freed a slot)."""
    session.info[_ADMIT] = True


# The pure scheduler: deterministic, no database.


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A waiting generation at the head of its tenant's line."""

    id: str
    created_at: dt.datetime


@dataclasses.dataclass
class TenantLine:
    """One waiting tenant as the scheduler sees it."""

    tenant_id: str
    in_flight: int
    heads: Sequence[Candidate]  # in the order they go (priority, then age)
    weight: int = 1
    max_in_flight: int | None = None
    # Its start tag in the fair clock (FairClock): the virtual time its next slot starts at.
    tag: float = 0.0


@dataclasses.dataclass
class FairClock:
    """Start-time fair queuing's virtual time: what breaks `choose`'s ties.

    A tenant's tag is the virtual time its next slot starts at. Each slot it gets moves its
    tag on by 1/weight from where that slot started, and the clock to that start. A tenant
    whose tag is behind the clock (it asked for nothing a while) starts at the clock, so an
    idle spell banks no slots for later. With few slots (one, say) every tenant holds none
    whenever one frees, and the tags alone share the slots: turn about for equal weights, 3:1
    for weights 3 and 1, nobody waiting for ever. Kept across passes in the account's row
    (`fair_clock`) and the tenants' (`fair_tag`); `tags` holds the tags this pass moved.
    """

    now: float = 0.0
    tags: dict[str, float] = dataclasses.field(default_factory=dict)

    def start(self, tenant: TenantLine) -> float:
        return max(self.tags.get(tenant.tenant_id, tenant.tag), self.now)

    def serve(self, tenant: TenantLine) -> None:
        self.now = self.start(tenant)
        self.tags[tenant.tenant_id] = self.now + 1 / max(1, tenant.weight)


def choose(free: int, tenants: Sequence[TenantLine], clock: FairClock | None = None) -> list[str]:
    """Which waiting generations get the `free` slots, in order.

    Slot by slot: among tenants with someone waiting and under their own `max_in_flight`, the
    one holding the fewest slots per unit of weight goes next; ties go to the tenant whose next
    slot starts earliest on the fair `clock` (a new one if None; it moves as slots are given),
    then to the one whose next generation has waited longest, then by tenant id (so the result
    never depends on order).
    """
    clock = clock if clock is not None else FairClock()
    picks: list[str] = []
    held = {t.tenant_id: t.in_flight for t in tenants}
    heads = {t.tenant_id: deque(t.heads) for t in tenants}

    def eligible(t: TenantLine) -> bool:
        capped = t.max_in_flight is not None and held[t.tenant_id] >= t.max_in_flight
        return bool(heads[t.tenant_id]) and not capped

    while free > 0:
        ready = [t for t in tenants if eligible(t)]
        if not ready:
            break
        nxt = min(
            ready,
            key=lambda t: (
                held[t.tenant_id] / max(1, t.weight),
                clock.start(t),
                heads[t.tenant_id][0].created_at,
                t.tenant_id,
            ),
        )
        picks.append(heads[nxt.tenant_id].popleft().id)
        held[nxt.tenant_id] += 1
        clock.serve(nxt)
        free -= 1
    return picks


# Limits.


def adapted_limit(
    account: UpstreamAccount, *, stated: int | None, in_flight: int
) -> tuple[int, str]:
    """The limit (and its source) after a 429; a configured limit never changes."""
    if account.limit_source == "configured":
        return account.limit, "configured"
    if stated is not None and stated > 0:
        return stated, "stated"
    return max(1, min(account.limit, max(in_flight, 1)) // 2), "probing"


def pause_after(refusals_in_a_row: int) -> float:
    """How long admissions wait after the n-th unexplained 429 in a row."""
    return min(PAUSE_MAX, PAUSE_FIRST * 2 ** max(0, refusals_in_a_row - 1))


@dataclasses.dataclass(frozen=True)
class Admission:
    """What one admission pass did."""

    admitted: list[str]
    claimed: ClaimedTask | None = None  # the submit task held by the caller (intake)


@dataclasses.dataclass(frozen=True)
class LineState:
    """The line as /metrics and the API show it."""

    limit: int
    limit_source: str
    in_flight: int
    waiting_by_tenant: dict[str, int]
    paused_until: dt.datetime | None


def waiting_tenant_ids(session: Session) -> list[str]:
    """The tenants with generations waiting, one index probe per tenant.

    A loose index scan (a recursive CTE stepping from one tenant to the next in the waiting
    index), where a plain DISTINCT would read every waiting row: a catalog of 10,000 waiting
    generations would make each admission pass read 10,000 index entries.
    """
    g = Generation.__table__.alias("g")
    waiting = sa.and_(g.c.status == GenerationStatus.QUEUED, g.c.admitted_at.is_(None))
    first = sa.select(sa.func.min(g.c.tenant_id).label("tenant_id")).where(waiting)
    tenants = first.cte("waiting_tenants", recursive=True)
    following = (
        sa.select(sa.func.min(g.c.tenant_id))
        .where(waiting, g.c.tenant_id > tenants.c.tenant_id)
        .scalar_subquery()
    )
    tenants = tenants.union_all(sa.select(following).where(tenants.c.tenant_id.is_not(None)))
    return list(
        session.scalars(sa.select(tenants.c.tenant_id).where(tenants.c.tenant_id.is_not(None)))
    )


def read_state(session: Session) -> LineState:
    """The limit, the slots in use and who waits (for /metrics)."""
    account = session.get(UpstreamAccount, ACCOUNT)
    in_flight = session.scalar(sa.select(sa.func.count()).where(IN_FLIGHT)) or 0
    waiting = session.execute(
        sa.select(Generation.tenant_id, sa.func.count())
        .where(WAITING)
        .group_by(Generation.tenant_id)
    ).all()
    return LineState(
        limit=account.limit if account else INITIAL_LIMIT,
        limit_source=account.limit_source if account else "probing",
        in_flight=int(in_flight),
        waiting_by_tenant={str(tenant): int(count) for tenant, count in waiting},
        paused_until=account.paused_until if account else None,
    )


class Line:
    """Admissions under the account's concurrency limit (see the module docstring)."""

    def __init__(self, store: Store, queue: TaskQueue, *, configured_limit: int | None) -> None:
        self.store = store
        self.queue = queue
        self.configured_limit = configured_limit

    def install(self) -> None:
        """Run an admission pass before the commit of any transaction that freed a slot."""
        self.store.before_commit[_ADMIT] = self._admit_if_asked

    def _admit_if_asked(self, session: Session) -> None:
        if session.info.pop(_ADMIT, False):
            self.admit(session, now=utcnow())

    # The account row.

    def _lock_account(self, session: Session) -> UpstreamAccount:
        """The account row, locked until the transaction ends (created on first use)."""
        locked = (
            sa.select(UpstreamAccount)
            .where(UpstreamAccount.id == ACCOUNT)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        account = session.scalars(locked).one_or_none()
        if account is None:
            table = sa.table(
                "upstream_accounts",
                *(sa.column(c.name, c.type) for c in UpstreamAccount.__table__.columns),
            )
            dialect = session.get_bind().dialect.name
            insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
            session.execute(
                insert.values(
                    id=ACCOUNT,
                    concurrency_limit=self.configured_limit or INITIAL_LIMIT,
                    limit_source="configured" if self.configured_limit else "probing",
                    accepted_at_limit=0,
                    refusals_in_a_row=0,
                    refused_before=False,
                    updated_at=utcnow(),
                ).on_conflict_do_nothing()  # two processes starting at once: one row
            )
            account = session.scalars(locked).one()
        self._agree_with_config(session, account)
        return account

    def _agree_with_config(self, session: Session, account: UpstreamAccount) -> None:
        """Follow GENRELAY_UPSTREAM_CONCURRENCY when it is set, changed or removed."""
        if self.configured_limit is not None:
            if (account.limit, account.limit_source) != (self.configured_limit, "configured"):
                account.limit, account.limit_source = self.configured_limit, "configured"
                account.updated_at = utcnow()
        elif account.limit_source == "configured":
            # The setting was removed: learn the limit again, from the start.
            account.limit, account.limit_source = INITIAL_LIMIT, "probing"
            account.refused_before = False
            account.accepted_at_limit = 0
            account.updated_at = utcnow()

    # Admission.

    def admit(
        self, session: Session, *, now: dt.datetime, claim_for: str | None = None
    ) -> Admission:
        """Give free slots to waiting generations, inside the caller's transaction.

        `claim_for`: a generation whose submit task, if it is admitted, is created already
        claimed by the caller (intake runs it at once); the others' tasks are due now. If it
        has to wait, the `line` task is woken to watch it (its deadline) within a second.
        """
        admission = self._admit(session, now=now, claim_for=claim_for)
        if claim_for is not None and admission.claimed is None:
            self._wake(session, now + dt.timedelta(seconds=TICK_BUSY))
        return admission

    def _wake(self, session: Session, at: dt.datetime) -> None:
        """Have the pending `line` task run by `at` (it may be sleeping its idle tick)."""
        session.execute(
            sa.update(Task)
            .where(Task.id == LINE_TASK_ID, Task.status == TaskStatus.PENDING, Task.run_at > at)
            .values(run_at=at)
            .execution_options(synchronize_session=False)
        )

    def admit_new(
        self,
        session: Session,
        generation_id: str,
        tenant_id: str,
        *,
        store: Callable[[dt.datetime | None], None],
        now: dt.datetime,
        deadline: dt.datetime | None = None,
    ) -> Admission:
        """Store a new generation and admit it if it can go now, in as few statements as the
        common case needs: `admit(claim_for=generation_id)` for intake.

        `store(admitted_at)` inserts the generation's row, in `session`'s transaction. Slots
        are handed out in every transaction that frees one, so a generation waiting while a
        slot is free is rare: usually nobody waits, and then the full pass would give the new
        generation the slot if there is one (and its tenant has no cap of its own). That is
        checked with one statement after the account's lock, and the generation is stored
        already admitted. Anything else (others waiting, a tenant cap, a deadline already
        passed) stores it waiting and takes the full pass, under the same lock. Either way
        the lock is held from the count to the commit.
        """
        account = self._lock_account_core(session)
        alone = None
        if account is not None:
            alone = self._admit_alone(session, account, tenant_id, now, deadline)
        store(now if alone else None)
        if alone:
            claimed = self.queue.enqueue_claimed(session, SUBMIT, generation_id=generation_id)
            return Admission([generation_id], claimed)
        if alone is None:
            admission = self._admit(session, now=now, claim_for=generation_id)
        else:
            admission = Admission([])  # no free slot: nobody is admitted, the full pass agrees
        if admission.claimed is None:
            self._wake(session, now + dt.timedelta(seconds=TICK_BUSY))
        return admission

    def _lock_account_core(self, session: Session) -> Any:
        """The account's limit and pause, its row locked until the transaction ends: one Core
        statement. None when the row is missing or does not follow the configuration yet
        (`_lock_account` creates or corrects it)."""
        row = session.connection().execute(_LOCK_ACCOUNT).first()
        if row is None:
            return None
        if self.configured_limit is not None:
            agrees = (row.concurrency_limit, row.limit_source) == (
                self.configured_limit,
                "configured",
            )
        else:
            agrees = row.limit_source != "configured"
        return row if agrees else None

    def _admit_alone(
        self,
        session: Session,
        account: Any,
        tenant_id: str,
        now: dt.datetime,
        deadline: dt.datetime | None,
    ) -> bool | None:
        """Whether a new generation of this tenant takes a free slot at once (nobody else
        waits): True, it does; False, no slot is free; None, the full pass must decide."""
        if account.paused_until is not None and account.paused_until > now:
            return False
        if deadline is not None and deadline <= now:
            return None
        limit = account.concurrency_limit
        row = (
            session.connection()
            .execute(_ALONE, {"limit": limit, "tenant_id": tenant_id})
            .one_or_none()
        )
        if row is None:
            return None
        used, others_wait, cap = row
        if used >= limit:
            return False
        if others_wait or cap is not None:
            return None
        return True

    def _admit(
        self,
        session: Session,
        *,
        now: dt.datetime,
        claim_for: str | None,
        account: UpstreamAccount | None = None,
    ) -> Admission:
        if account is None:
            account = self._lock_account(session)
        if account.paused_until is not None and account.paused_until > now:
            return Admission([])
        in_flight = dict(
            session.execute(
                sa.select(Generation.tenant_id, sa.func.count())
                .where(IN_FLIGHT)
                .group_by(Generation.tenant_id)
            ).all()
        )
        free = account.limit - sum(in_flight.values())
        if free <= 0:
            return Admission([])
        waiting_tenants = waiting_tenant_ids(session)
        if not waiting_tenants:
            return Admission([])
        settings = {
            row.id: row
            for row in session.execute(
                sa.select(Tenant.id, Tenant.weight, Tenant.max_in_flight, Tenant.fair_tag).where(
                    Tenant.id.in_(waiting_tenants)
                )
            )
        }

        # With very many waiting tenants, consider those `choose` would serve first: the fewest
        # slots held per unit of weight, then the earliest next slot on the fair clock (without
        # it, ties kept the same first ones by id in every pass, and the rest waited for ever).
        def turn(tenant: str) -> tuple[float, float, str]:
            row = settings.get(tenant)
            weight, tag = (row.weight, row.fair_tag or 0.0) if row is not None else (1, 0.0)
            return (in_flight.get(tenant, 0) / max(1, weight), max(tag, account.fair_clock), tenant)

        def at_cap(tenant: str) -> bool:
            row = settings.get(tenant)
            cap = row.max_in_flight if row is not None else None
            return cap is not None and in_flight.get(tenant, 0) >= cap

        # Tenants at their own `max_in_flight` are left out before the cut: `choose` could give
        # them nothing, and with many of them they would fill the places and leave slots idle.
        waiting_tenants = [t for t in waiting_tenants if not at_cap(t)]
        waiting_tenants.sort(key=turn)
        waiting_tenants = waiting_tenants[:MAX_TENANTS_PER_PASS]
        heads = self._heads(session, waiting_tenants, free, now)
        lines = [
            TenantLine(
                tenant_id=tenant,
                in_flight=in_flight.get(tenant, 0),
                heads=heads.get(tenant, []),
                weight=settings[tenant].weight if tenant in settings else 1,
                max_in_flight=settings[tenant].max_in_flight if tenant in settings else None,
                tag=settings[tenant].fair_tag if tenant in settings else 0.0,
            )
            for tenant in waiting_tenants
        ]
        clock = FairClock(account.fair_clock)
        picks = choose(free, lines, clock)
        if not picks:
            return Admission([])
        # Rows another transaction holds (a cancel in flight) are skipped, not waited for:
        # the next pass finds them again if they still wait.
        locked = set(
            session.scalars(
                sa.select(Generation.id)
                .where(Generation.id.in_(picks), WAITING)
                .with_for_update(skip_locked=True)
            )
        )
        admitted = [g for g in picks if g in locked]
        if not admitted:
            return Admission([])
        session.execute(
            sa.update(Generation)
            .where(Generation.id.in_(admitted))
            .values(admitted_at=now, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        # The fair clock as the picks moved it (a pick whose row was held elsewhere counts as
        # served: it is first in its tenant's line next time anyway).
        account.fair_clock = clock.now
        for tenant_id, tag in clock.tags.items():
            session.execute(
                sa.update(Tenant)
                .where(Tenant.id == tenant_id)
                .values(fair_tag=tag)
                .execution_options(synchronize_session=False)
            )
        claimed = None
        for generation_id in admitted:
            if generation_id == claim_for:
                claimed = self.queue.enqueue_claimed(session, SUBMIT, generation_id=generation_id)
            else:
                self.queue.enqueue(session, SUBMIT, generation_id=generation_id)
        log.debug("admitted %d generation(s); %d slot(s) were free", len(admitted), free)
        return Admission(admitted, claimed)

    def _heads(
        self, session: Session, tenants: list[str], count: int, now: dt.datetime
    ) -> dict[str, list[Candidate]]:
        """The first `count` waiting generations of each tenant, in line order."""
        branches = [
            sa.select(Generation.tenant_id, Generation.id, Generation.created_at)
            .where(
                Generation.tenant_id == tenant,
                WAITING,
                sa.or_(Generation.deadline_at.is_(None), Generation.deadline_at > now),
            )
            .order_by(Generation.priority.desc(), Generation.created_at, Generation.id)
            .limit(count)
            .subquery()
            .select()
            for tenant in tenants
        ]
        heads: dict[str, list[Candidate]] = {}
        # In chunks: SQLite allows a limited number of compound SELECT terms.
        for start in range(0, len(branches), 100):
            chunk = branches[start : start + 100]
            statement = chunk[0] if len(chunk) == 1 else sa.union_all(*chunk)
            for tenant, generation_id, created_at in session.execute(statement):
                created = created_at if created_at.tzinfo else created_at.replace(tzinfo=dt.UTC)
                heads.setdefault(tenant, []).append(Candidate(generation_id, created))
        return heads

    # What submissions teach about the limit.

    def note_accepted(self, session: Session) -> None:
        """A job was accepted upstream: probing limits grow (inside the submit's transaction)."""
        current = session.connection().execute(_ACCOUNT_LEARNING).first()
        if current is None or current.limit_source != "probing":
            if current is not None and current.refusals_in_a_row:
                session.execute(
                    sa.update(UpstreamAccount)
                    .where(UpstreamAccount.id == ACCOUNT)
                    .values(refusals_in_a_row=0)
                    .execution_options(synchronize_session=False)
                )
            return
        account = self._lock_account(session)
        account.refusals_in_a_row = 0
        in_flight = session.scalar(sa.select(sa.func.count()).where(IN_FLIGHT)) or 0
        if in_flight < account.limit:
            return  # not using every slot: nothing learned about a higher limit
        account.accepted_at_limit += 1
        if not account.refused_before or account.accepted_at_limit >= account.limit:
            account.limit += 1
            account.accepted_at_limit = 0
            slot_freed(session)  # one more slot to hand out
        account.updated_at = utcnow()

    def note_refused(
        self, session: Session, generation_id: str, *, stated: int | None, now: dt.datetime
    ) -> None:
        """A 429: the generation hands its slot back and waits again; the limit adapts."""
        released = session.execute(
            sa.update(Generation)
            .where(
                Generation.id == generation_id,
                Generation.status == GenerationStatus.QUEUED,
                Generation.admitted_at.is_not(None),
            )
            .values(admitted_at=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        handed_back = int(getattr(released, "rowcount", 0) or 0)
        account = self._lock_account(session)
        in_flight = session.scalar(sa.select(sa.func.count()).where(IN_FLIGHT)) or 0
        # The refused job held a slot when it was sent: what was in use is halved with it.
        limit, source = adapted_limit(account, stated=stated, in_flight=in_flight + handed_back)
        if (limit, source) != (account.limit, account.limit_source):
            log.warning(
                "Deep-Image refused a job (429): concurrency limit %d -> %d (%s)",
                account.limit,
                limit,
                source,
            )
        account.limit, account.limit_source = limit, source
        account.refused_before = True
        account.accepted_at_limit = 0
        resume = now
        if in_flight < limit:
            # Our own count does not explain the refusal: back off before trying again.
            account.refusals_in_a_row += 1
            account.paused_until = now + dt.timedelta(
                seconds=pause_after(account.refusals_in_a_row)
            )
            resume = account.paused_until
        account.updated_at = now
        # The generation waits again, and nothing else may free a slot: have the `line` task
        # admit it as soon as admissions resume, not at its idle tick.
        self._wake(session, resume)

    # Deadlines and the periodic pass.

    def cancel_overdue(self, now: dt.datetime) -> int:
        """Cancel generations whose deadline passed while they waited; return how many."""
        from service.generations.lifecycle import change_status

        with self.store.transaction() as session:
            overdue = list(
                session.scalars(
                    sa.select(Generation.id)
                    .where(WAITING, Generation.deadline_at <= now)
                    .limit(DEADLINE_BATCH)
                    .with_for_update(skip_locked=True)
                )
            )
            for generation_id in overdue:
                change_status(
                    session,
                    generation_id,
                    GenerationStatus.CANCELED,
                    now=now,
                    error_code=ErrorCode.DEADLINE_EXCEEDED.value,
                    error_message="the deadline passed while the generation waited for a "
                    "Deep-Image slot; it was never submitted",
                )
        return len(overdue)

    def position(self, session: Session, generation: Generation) -> int | None:
        """1 for the next of its tenant's waiting generations to go; None if not waiting."""
        if generation.status != GenerationStatus.QUEUED or generation.admitted_at is not None:
            return None
        ahead = session.scalar(
            sa.select(sa.func.count()).where(
                Generation.tenant_id == generation.tenant_id,
                WAITING,
                sa.or_(
                    Generation.priority > generation.priority,
                    sa.and_(
                        Generation.priority == generation.priority,
                        sa.or_(
                            Generation.created_at < generation.created_at,
                            sa.and_(
                                Generation.created_at == generation.created_at,
                                Generation.id < generation.id,
                            ),
                        ),
                    ),
                ),
            )
        )
        return int(ahead or 0) + 1


class LineHandler:
    """The `line` task: cancel overdue waiting generations, admit, and come back soon."""

    def __init__(self, line: Line) -> None:
        self.line = line

    def run(self, task: ClaimedTask) -> Later:
        now = utcnow()
        try:
            self.line.cancel_overdue(now)
            with self.line.store.transaction() as session:
                self.line.admit(session, now=now)
                # Busy while anyone holds a slot too: a 429 may send it back to wait.
                busy = session.scalar(
                    sa.select(Generation.id).where(sa.or_(WAITING, IN_FLIGHT)).limit(1)
                )
        except Exception as exc:
            log.exception("the line's periodic pass failed; trying again shortly")
            return Later(TICK_BUSY, f"pass failed: {type(exc).__name__}")
        return Later(TICK_BUSY if busy else TICK_IDLE, "next pass")

    def on_exhausted(self, task: ClaimedTask, error: str) -> None:
        """`ensure_line_task` revives it when a worker starts."""


def ensure_line_task(queue: TaskQueue) -> None:
    """Create the `line` task if missing, or revive it if it died (a worker calls this)."""
    queue.ensure_singleton(LINE_TASK_ID, LINE)
