"""The line on real SQLite and PostgreSQL with the simulator over HTTP: admissions under the
limit, slots freed by every way a job ends, learned limits, priority, deadlines, tenants."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from service.bootstrap import Services
from service.config import Config
from service.generations.line import IN_FLIGHT, ensure_line_task
from service.models import Generation, Task, UpstreamAccount
from service.runtime.kinds import LINE
from service.runtime.worker import Worker
from service.tenants import Tenants
from tests.helpers import drain, seed_examples, set_simulator
from tests.integration.test_api_keys_cli import Run, create_key, genrelay  # noqa: F401

TEXT_ONLY = seed_examples()["text_only"]


def post(client: Any, auth: dict[str, str], **body: Any) -> dict[str, Any]:
    response = client.post("/v1/generations", json={"input": TEXT_ONLY, **body}, headers=auth)
    assert response.status_code == 202, response.json
    return response.json  # type: ignore[no-any-return]


def in_flight(services: Services) -> int:
    with services.store.read() as session:
        return session.scalar(sa.select(sa.func.count()).where(IN_FLIGHT)) or 0


def statuses(services: Services) -> dict[str, str]:
    with services.store.read() as session:
        return dict(session.execute(sa.select(Generation.id, Generation.status)).all())


def sim_stats(simulator: Any) -> dict[str, Any]:
    return requests.get(f"{simulator.url}/_sim/stats", timeout=5).json()  # type: ignore[no-any-return]


def run_line_task(services: Services) -> None:
    """What the worker's `line` task does every second, once, now."""
    ensure_line_task(services.queue)
    with services.store.transaction() as session:
        session.execute(
            sa.update(Task).where(Task.kind == LINE).values(run_at=dt.datetime.now(dt.UTC))
        )
    [task] = services.queue.claim_due_tasks(kinds=[LINE])
    services.runner.execute(task)


@pytest.fixture
def slow_upstream(simulator: Any) -> Any:
    """Jobs that stay at Deep-Image for the length of a test."""
    set_simulator(simulator.url, processing_time=60.0)
    return simulator


def test_only_the_limit_goes_upstream_and_the_rest_wait_in_order(
    config: Config, make_client: Any, slow_upstream: Any
) -> None:
    services, client, auth = make_client(config.replace(upstream_concurrency=2))
    made = [post(client, auth) for _ in range(5)]
    assert [g["status"] for g in made] == ["processing"] * 2 + ["queued"] * 3
    assert in_flight(services) == 2
    assert sim_stats(slow_upstream)["jobs_created"] == 2
    positions = [
        client.get(f"/v1/generations/{g['id']}", headers=auth).json["queue_position"] for g in made
    ]
    assert positions == [None, None, 1, 2, 3]


@pytest.mark.parametrize("ending", ["failure", "result", "canceled job ended"])
def test_a_slot_is_handed_on_the_moment_its_job_ends(
    config: Config, make_client: Any, slow_upstream: Any, ending: str
) -> None:
    services, client, auth = make_client(config.replace(upstream_concurrency=1))
    first, second = post(client, auth), post(client, auth)
    assert (first["status"], second["status"]) == ("processing", "queued")
    if ending == "canceled job ended":
        client.post(f"/v1/generations/{first['id']}/cancel", headers=auth)
        from service.generations.completion import Callback

        # Deep-Image has no cancel: the job runs on and holds the account's slot until its
        # callback (or a poll) says it is over.
        assert in_flight(services) == 1
        assert statuses(services)[second["id"]] == "queued"
        services.completion.accept(
            first["id"], Callback(first["upstream"]["job"], f"{slow_upstream.url}/images/r.png")
        )
    elif ending == "failure":
        from service.domain import ErrorCode
        from service.generations.lifecycle import fail_generation

        with services.store.transaction() as session:
            fail_generation(session, first["id"], ErrorCode.UPSTREAM_JOB_FAILED, "boom")
    else:
        from service.generations.completion import Callback

        services.completion.accept(
            first["id"], Callback(first["upstream"]["job"], f"{slow_upstream.url}/images/r.png")
        )
    # The same transaction admitted the next one: its submit task is due now.
    with services.store.read() as session:
        admitted = session.get(Generation, second["id"])
        assert admitted is not None and admitted.admitted_at is not None
        tasks = session.scalars(
            sa.select(Task.status).where(Task.generation_id == second["id"], Task.kind == "submit")
        ).all()
    assert tasks == ["pending"]
    assert in_flight(services) == 1


def test_a_canceled_job_keeps_its_slot_until_a_poll_finds_it_over(
    config: Config, make_client: Any, simulator: Any
) -> None:
    set_simulator(simulator.url, processing_time=1.0)
    services, client, auth = make_client(config.replace(upstream_concurrency=1))
    first, second = post(client, auth), post(client, auth)
    client.post(f"/v1/generations/{first['id']}/cancel", headers=auth)
    assert in_flight(services) == 1
    drain(services, seconds=30)  # polls the canceled job until it ends, then runs the next
    after = statuses(services)
    assert (after[first["id"]], after[second["id"]]) == ("canceled", "succeeded")
    assert in_flight(services) == 0
    stats = sim_stats(simulator)
    assert (stats["jobs_created"], stats["responses_429"]) == (2, 0)


def test_a_generation_canceled_before_its_job_exists_frees_its_slot_at_once(
    config: Config, make_client: Any, slow_upstream: Any
) -> None:
    services, client, auth = make_client(config.replace(upstream_concurrency=1))
    set_simulator(slow_upstream.url, upstream_error_rate=1.0)
    first = post(client, auth)  # admitted; its submit failed and waits to be retried
    second = post(client, auth)
    assert in_flight(services) == 1 and first["upstream"]["job"] is None
    client.post(f"/v1/generations/{first['id']}/cancel", headers=auth)
    with services.store.read() as session:
        admitted = session.get(Generation, second["id"])
        assert admitted is not None and admitted.admitted_at is not None


def test_a_job_created_while_its_generation_was_canceled_holds_a_slot_until_it_ends(
    config: Config, make_client: Any, simulator: Any
) -> None:
    # The cancel came while the submit's POST was on its way: the job exists at Deep-Image,
    # which has no cancel. It is recorded on the canceled generation and counted in flight,
    # like any canceled job, until a poll finds it over.
    services, client, auth = make_client(config.replace(upstream_concurrency=1))
    set_simulator(simulator.url, upstream_error_rate=1.0)
    generation = post(client, auth)  # admitted; its submit failed and waits to be retried
    set_simulator(simulator.url, upstream_error_rate=0.0, processing_time=1.0)
    process = services.deepimage.process

    def cancel_then_process(payload: dict[str, Any]) -> Any:
        services.deepimage.process = process  # type: ignore[method-assign]
        canceled = client.post(f"/v1/generations/{generation['id']}/cancel", headers=auth)
        assert canceled.status_code == 200
        return process(payload)

    services.deepimage.process = cancel_then_process  # type: ignore[method-assign]
    with services.store.transaction() as session:  # the submit's retry, due now
        session.execute(
            sa.update(Task).where(Task.kind == "submit").values(run_at=dt.datetime.now(dt.UTC))
        )
    (submit,) = services.queue.claim_due_tasks(kinds=["submit"])
    services.runner.execute(submit)
    assert services.deepimage.process is process  # the cancel came during the POST
    shown = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert shown["status"] == "canceled" and shown["upstream"]["job"] is not None
    assert in_flight(services) == 1
    drain(services, seconds=30)  # polls the canceled job until it ends
    assert in_flight(services) == 0
    assert sim_stats(simulator)["jobs_created"] == 1


def test_an_item_of_a_batch_being_canceled_is_canceled_not_sent_when_a_slot_frees(
    config: Config, make_client: Any, slow_upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch's cancel goes through its items a chunk at a time (the rest in a task). A slot
    # freed meanwhile may be handed to an item not yet reached: it must not go upstream.
    import service.generations.batches as batches
    from service.generations.completion import Callback

    monkeypatch.setattr(batches, "CANCEL_CHUNK", 7)
    monkeypatch.setattr(batches, "CANCEL_BUDGET", 0.0)  # one chunk in the request, then a task
    services, client, auth = make_client(config.replace(upstream_concurrency=2))
    items = [{"input": TEXT_ONLY, "metadata": {"n": str(n)}} for n in range(30)]
    batch = client.post("/v1/batches", json={"items": items}, headers=auth).json
    while claimed := services.queue.claim_due_tasks(kinds=["submit"]):
        for task in claimed:
            services.runner.execute(task)
    assert sim_stats(slow_upstream)["jobs_created"] == 2
    canceled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=auth)
    assert canceled.status_code == 200 and canceled.json["canceled_at"] is not None
    with services.store.read() as session:
        running = session.scalars(sa.select(Generation).where(Generation.upstream_job.is_not(None)))
        first = running.first()
    assert first is not None
    # One running job ends before the cancel's task reaches the waiting items: its slot goes
    # to the next of them, whose submit runs.
    services.completion.accept(first.id, Callback(first.upstream_job, f"{slow_upstream.url}/r.png"))
    (submit,) = services.queue.claim_due_tasks(kinds=["submit"])
    services.runner.execute(submit)
    assert sim_stats(slow_upstream)["jobs_created"] == 2
    assert statuses(services)[submit.generation_id] == "canceled"
    (rest,) = services.queue.claim_due_tasks(kinds=["cancel_batch"])
    services.runner.execute(rest)  # the cancel's task finishes the rest
    assert set(statuses(services).values()) == {"canceled"}
    assert sim_stats(slow_upstream)["jobs_created"] == 2


def test_a_stated_limit_is_learned_and_never_exceeded_again(
    config: Config, make_client: Any, slow_upstream: Any
) -> None:
    set_simulator(slow_upstream.url, concurrency_limit=3)
    services, client, auth = make_client(config)  # no configured limit: learned
    made = [post(client, auth) for _ in range(12)]
    # Slow start from 2: the limit grows with each job accepted at the limit, until the 4th
    # submission is refused with "Your rate limit is 3"; that one waits again, and so does
    # everything after it, without another call upstream.
    assert [g["status"] for g in made] == ["processing"] * 3 + ["queued"] * 9
    with services.store.read() as session:
        account = session.get(UpstreamAccount, "deepimage")
        assert account is not None
        assert (account.limit, account.limit_source) == (3, "stated")
    stats = sim_stats(slow_upstream)
    assert (stats["jobs_created"], stats["responses_429"]) == (3, 1)
    assert in_flight(services) == 3
    shown = client.get(f"/v1/generations/{made[3]['id']}", headers=auth).json
    assert shown["queue_position"] == 1  # the refused one kept its place


def test_a_learned_limit_carries_a_backlog_through(
    config: Config, make_client: Any, simulator: Any
) -> None:
    set_simulator(simulator.url, concurrency_limit=3, processing_time=0.3)
    services, client, auth = make_client(config)
    for _ in range(10):
        post(client, auth)
    drain(services, seconds=60)
    assert set(statuses(services).values()) == {"succeeded"}
    assert sim_stats(simulator)["jobs_created"] == 10


def test_an_unstated_429_halves_a_learned_limit_and_pauses(
    config: Config, make_client: Any, services: Services
) -> None:
    from service.models import utcnow

    now = utcnow()
    with services.store.transaction() as session:
        services.line.admit(session, now=now)  # creates the account row
        account = session.get(UpstreamAccount, "deepimage")
        assert account is not None
        account.limit = 8
    with services.store.transaction() as session:
        services.line.note_refused(session, "gen_none", stated=None, now=now)
    with services.store.read() as session:
        account = session.get(UpstreamAccount, "deepimage")
        assert account is not None
        assert (account.limit, account.limit_source, account.refusals_in_a_row) == (
            1,
            "probing",
            1,
        )
        assert account.paused_until is not None and account.paused_until > now


def test_higher_priority_passes_earlier_work_of_the_same_tenant(
    config: Config, make_client: Any, slow_upstream: Any
) -> None:
    services, client, auth = make_client(config.replace(upstream_concurrency=1))
    running = post(client, auth)
    batch_work = [post(client, auth) for _ in range(3)]
    interactive = post(client, auth, priority=5)
    shown = client.get(f"/v1/generations/{interactive['id']}", headers=auth).json
    assert shown["queue_position"] == 1
    from service.domain import ErrorCode
    from service.generations.lifecycle import fail_generation

    with services.store.transaction() as session:
        fail_generation(session, running["id"], ErrorCode.UPSTREAM_JOB_FAILED, "boom")
    with services.store.read() as session:
        admitted = session.scalars(sa.select(Generation.id).where(IN_FLIGHT)).all()
    assert admitted == [interactive["id"]]
    assert all(
        client.get(f"/v1/generations/{g['id']}", headers=auth).json["status"] == "queued"
        for g in batch_work
    )


def test_a_generation_still_waiting_at_its_deadline_is_canceled_unsubmitted(
    config: Config, make_client: Any, slow_upstream: Any
) -> None:
    services, client, auth = make_client(config.replace(upstream_concurrency=1))
    post(client, auth)
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    late = post(client, auth, deadline=deadline.isoformat())
    assert late["status"] == "queued" and late["deadline"] is not None
    assert sim_stats(slow_upstream)["jobs_created"] == 1
    threading.Event().wait(1.2)
    run_line_task(services)
    after = client.get(f"/v1/generations/{late['id']}", headers=auth).json
    assert after["status"] == "canceled"
    assert after["error"]["code"] == "deadline_exceeded"
    assert sim_stats(slow_upstream)["jobs_created"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"priority": 10}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"deadline": "2001-01-01T00:00:00Z"}, "deadline"),
        ({"deadline": "tomorrow"}, "deadline"),
    ],
)
def test_bad_priorities_and_deadlines_are_refused_naming_the_field(
    client: Any, auth: dict[str, str], body: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/generations", json={"input": TEXT_ONLY, **body}, headers=auth)
    assert response.status_code == 422
    assert response.content_type == "application/problem+json"
    assert [e["field"] for e in response.json["errors"]] == [field]


def test_tenants_share_slots_by_weight_and_respect_their_cap(
    config: Config, make_client: Any, slow_upstream: Any
) -> None:
    services, client, auth_a = make_client(config.replace(upstream_concurrency=1))
    auth_b = {"Authorization": "Bearer " + services.api_keys.create("beta")}
    auth_c = {"Authorization": "Bearer " + services.api_keys.create("gamma")}
    tenants = Tenants(services.store)
    tenants.set("acme", weight=3)
    tenants.set("gamma", max_in_flight=1)
    blocker = post(client, auth_a)
    for auth in (auth_a, auth_b, auth_c):
        for _ in range(6):
            post(client, auth)
    # Raise the limit to 10: gamma stops at its cap of 1; acme (weight 3, one slot held
    # already) and beta (weight 1) share the other 9 as closely to 3:1 as whole slots allow.
    services2, _client, _auth = make_client(config.replace(upstream_concurrency=10))
    with services2.store.transaction() as session:
        services2.line.admit(session, now=dt.datetime.now(dt.UTC))
    with services2.store.read() as session:
        held = dict(
            session.execute(
                sa.select(Generation.tenant_id, sa.func.count())
                .where(IN_FLIGHT)
                .group_by(Generation.tenant_id)
            ).all()
        )
    names = {t.id: t.name for t in tenants.list()}
    assert {names[t]: n for t, n in held.items()} == {"acme": 7, "beta": 2, "gamma": 1}
    assert blocker["status"] == "processing"


def holder(services: Services) -> str:
    """The one generation holding the account's one slot."""
    with services.store.read() as session:
        [generation_id] = session.scalars(sa.select(Generation.id).where(IN_FLIGHT)).all()
    return generation_id


@pytest.mark.parametrize("weight", [1, 1000])
def test_with_one_slot_another_tenants_request_goes_next_not_after_a_catalog(
    config: Config, make_client: Any, slow_upstream: Any, weight: int
) -> None:
    from service.domain import ErrorCode
    from service.generations.lifecycle import fail_generation

    services, client, auth_a = make_client(config.replace(upstream_concurrency=1))
    auth_b = {"Authorization": "Bearer " + services.api_keys.create("beta")}
    Tenants(services.store).set("beta", weight=weight)
    items = [{"input": TEXT_ONLY} for _ in range(6)]
    catalog = client.post("/v1/batches", json={"items": items}, headers=auth_a).json
    single = post(client, auth_b)
    assert single["status"] == "queued"
    holders = []
    for _ in range(3):
        holders.append(holder(services))
        with services.store.transaction() as session:  # its job ends: the slot is handed on
            fail_generation(session, holders[-1], ErrorCode.UPSTREAM_JOB_FAILED, "over")
    owner = {g["id"]: "catalog" for g in client.get(
        f"/v1/generations?batch={catalog['id']}&limit=10", headers=auth_a
    ).json["data"]}  # fmt: skip
    owner[single["id"]] = "single"
    # Both hold nothing when the catalog's item ends; the catalog's next one is older, but
    # the single request has had no slot yet.
    assert [owner[g] for g in holders] == ["catalog", "single", "catalog"]


def test_tenants_past_the_ones_a_pass_considers_still_get_their_turn(
    config: Config, make_client: Any, slow_upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass considers MAX_TENANTS_PER_PASS waiting tenants (500): with more, the same first
    ones by id were kept in every pass, and the others never got a slot."""
    from service.domain import ErrorCode
    from service.generations import line
    from service.generations.lifecycle import fail_generation

    monkeypatch.setattr(line, "MAX_TENANTS_PER_PASS", 2)
    services, client, auth = make_client(config.replace(upstream_concurrency=1))
    auths = {"acme": auth}
    for name in ("beta", "gamma"):
        auths[name] = {"Authorization": "Bearer " + services.api_keys.create(name)}
    owner = {post(client, auth)["id"]: name for name, auth in auths.items() for _ in range(3)}
    holders = []
    for _ in range(4):
        holders.append(holder(services))
        with services.store.transaction() as session:  # its job ends: the slot is handed on
            fail_generation(session, holders[-1], ErrorCode.UPSTREAM_JOB_FAILED, "over")
    assert [owner[g] for g in holders] == ["acme", "beta", "gamma", "acme"]


def test_tenants_at_their_cap_do_not_crowd_others_out_of_a_pass(
    config: Config, make_client: Any, slow_upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more waiting tenants than a pass considers, tenants already at their
    `max_in_flight` took the places first (they were ranked by slots held, not by whether they
    could take one): the pass found nobody it could admit and free slots stayed idle."""
    from service.generations import line

    monkeypatch.setattr(line, "MAX_TENANTS_PER_PASS", 3)
    services, client, auth = make_client(config.replace(upstream_concurrency=10))
    tenants = Tenants(services.store)
    for name in ("beta", "gamma", "delta"):
        capped = {"Authorization": "Bearer " + services.api_keys.create(name)}
        tenants.set(name, max_in_flight=1)
        assert post(client, capped)["status"] == "processing"
        assert post(client, capped)["status"] == "queued"  # at its cap: it waits
    # acme has no cap and holds the most slots, so every capped tenant ranks before it.
    for _ in range(2):
        assert post(client, auth)["status"] == "processing"
    late = post(client, auth)
    run_line_task(services)
    assert client.get(f"/v1/generations/{late['id']}", headers=auth).json["status"] == (
        "processing"
    )
    assert in_flight(services) == 6


def test_an_unstated_429_halves_the_slots_in_use_counting_the_refused_job(
    config: Config, make_client: Any, slow_upstream: Any
) -> None:
    from service.models import utcnow

    services, client, auth = make_client(config)  # no configured limit: learned
    post(client, auth)  # makes the account's row
    with services.store.transaction() as session:
        account = session.get(UpstreamAccount, "deepimage")
        assert account is not None
        account.limit, account.refused_before = 4, True
    running = [post(client, auth) for _ in range(2)]
    assert {g["status"] for g in running} == {"processing"}  # 3 jobs running
    # A fourth is admitted; its submit fails (it stays admitted), then counts as refused
    # with a 429 that states no limit.
    set_simulator(slow_upstream.url, upstream_error_rate=1.0)
    refused = post(client, auth)
    assert refused["status"] == "queued" and in_flight(services) == 4
    with services.store.transaction() as session:
        services.line.note_refused(session, refused["id"], stated=None, now=utcnow())
    with services.store.read() as session:
        account = session.get(UpstreamAccount, "deepimage")
        assert account is not None
        assert (account.limit, account.limit_source) == (2, "probing")  # 4 in use, halved


def test_concurrent_intakes_never_admit_more_than_the_limit(
    config: Config, make_client: Any, slow_upstream: Any
) -> None:
    services, _client, auth = make_client(config.replace(upstream_concurrency=3))
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for _ in range(4):
                services.generations.create(
                    tenant_of(services, auth),
                    _new(),
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert in_flight(services) == 3
    assert sim_stats(slow_upstream)["jobs_created"] == 3
    assert list(statuses(services).values()).count("queued") == 21


def tenant_of(services: Services, auth: dict[str, str]) -> str:
    tenant = services.api_keys.tenant_for(auth["Authorization"].split()[1])
    assert tenant is not None
    return tenant.id


def _new() -> Any:
    from service.generations.service import NewGeneration

    return NewGeneration(input=TEXT_ONLY)


def test_the_worker_line_task_admits_after_a_pause(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(config.replace(upstream_concurrency=2))
    set_simulator(simulator.url, rate_limit_rate=1.0)
    waiting = post(client, auth)
    assert waiting["status"] == "queued"
    set_simulator(simulator.url, rate_limit_rate=0.0)
    ensure_line_task(services.queue)
    worker = Worker(services.runner, threads=2, poll_interval=0.05)
    runner = threading.Thread(target=worker.run)
    runner.start()
    try:
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20)
        while dt.datetime.now(dt.UTC) < deadline:
            if statuses(services)[waiting["id"]] == "succeeded":
                break
            threading.Event().wait(0.1)
    finally:
        worker.stop()
        runner.join()
    assert statuses(services)[waiting["id"]] == "succeeded"


def test_tenants_cli_shows_and_changes_settings(genrelay: Callable[..., Run]) -> None:  # noqa: F811
    create_key(genrelay, "acme")
    changed = genrelay("tenants", "set", "acme", "--weight", "3", "--max-in-flight", "5")
    assert changed.code == 0, changed.err
    assert changed.out.split("\t")[2:4] == ["weight=3", "max_in_flight=5"]
    uncapped = genrelay("tenants", "set", "acme", "--max-in-flight", "none")
    assert uncapped.out.strip().split("\t")[2:4] == ["weight=3", "max_in_flight=-"]
    listed = genrelay("tenants", "list")
    assert [line.split("\t")[0] for line in listed.out.splitlines()] == ["acme"]
    assert genrelay("tenants", "show", "nobody").code == 1
    assert genrelay("tenants", "set", "acme", "--weight", "0").code == 2
    # Past any account's jobs, and past the database's integer: a traceback before.
    too_many = genrelay("tenants", "set", "acme", "--max-in-flight", "3000000000")
    assert too_many.code == 2
    assert "max in flight must be a whole number from 1 to 100000" in too_many.err
