"""The whole stack as separate processes: `genrelay serve` (gunicorn), `genrelay worker` and
`genrelay simulator`, set up with `genrelay migrate` and `genrelay keys create`."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
import sqlalchemy as sa
from PIL import Image

from service.adapters.blobstore import crc32c_base64
from service.database import Store
from service.devtools.ports import free_port
from service.generations.callback_urls import callback_token, callback_url
from service.models import Task, utcnow
from service.runtime.housekeeping import TASK_ID
from tests.conftest import new_postgres_database
from tests.e2e.processes import GENRELAY, Stack, wait_for
from tests.helpers import seed_examples, set_simulator

pytestmark = pytest.mark.e2e

CALLBACK_SECRET = "e2e-callback-secret-0123456789"


@contextlib.contextmanager
def running_stack(
    tmp_path: Path, database_url: str, gcs_url: str, gcs_bucket: str
) -> Iterator[dict[str, Any]]:
    """Migrate, create a key of `acme`, start the simulator, `genrelay serve` (2 processes)
    and `genrelay worker`; what the tests need to reach them."""
    sim_port, web_port = free_port(), free_port()
    env = {
        **os.environ,
        "GENRELAY_DATABASE_URL": database_url,
        "GENRELAY_DEEPIMAGE_URL": f"http://127.0.0.1:{sim_port}",
        "GENRELAY_DEEPIMAGE_API_KEY": "sim-key",
        # Callbacks reach the web process (its endpoint arrives with the completion path).
        "GENRELAY_PUBLIC_URL": f"http://127.0.0.1:{web_port}",
        "GENRELAY_CALLBACK_SECRET": CALLBACK_SECRET,
        # Callbacks are the path under test here; polling is only a late fallback.
        "GENRELAY_RECONCILE_AFTER": "600",
        "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
        "GENRELAY_GCS_BUCKET": gcs_bucket,
        "STORAGE_EMULATOR_HOST": gcs_url,
        "GENRELAY_WEB_PROCESSES": "2",
        "PORT": str(web_port),
    }
    stack = Stack(tmp_path, env)
    try:
        migrate = subprocess.run([GENRELAY, "migrate"], env=env, capture_output=True, timeout=60)
        assert migrate.returncode == 0, migrate.stderr.decode()
        keys = subprocess.run(
            [GENRELAY, "keys", "create", "acme"],
            env=env,
            capture_output=True,
            timeout=60,
            text=True,
        )
        assert keys.returncode == 0, keys.stderr
        api_key = keys.stdout.strip()
        assert keys.stdout == api_key + "\n"  # the key alone on stdout
        stack.start("simulator", "simulator", "--port", str(sim_port), "--processing-time", "0.3")
        stack.start("serve", "serve")
        worker_metrics = free_port()
        stack.start(
            "worker",
            "worker",
            "--threads",
            "2",
            "--poll-interval",
            "0.1",
            "--http-port",
            str(worker_metrics),
        )
        base = f"http://127.0.0.1:{web_port}"
        sim = f"http://127.0.0.1:{sim_port}"
        wait_for(
            lambda: stack.alive() and requests.get(f"{sim}/_sim/stats", timeout=1).ok,
            20,
            "the simulator",
        )
        wait_for(
            lambda: stack.alive() and requests.get(f"{base}/readyz", timeout=1).ok,
            30,
            "genrelay serve",
        )
        # Its SIGTERM handler is in place once it says so (a cold start compiles bytecode).
        wait_for(
            lambda: stack.alive() and "worker started" in stack.logs(tail=None),
            30,
            "genrelay worker",
        )
        yield {
            "base": base,
            "sim": sim,
            "auth": {"Authorization": f"Bearer {api_key}"},
            "stack": stack,
            "gcs": gcs_url,
            "bucket": gcs_bucket,
            "worker_metrics": f"http://127.0.0.1:{worker_metrics}",
            "database_url": database_url,
        }
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop_all()


@pytest.fixture
def stack(
    tmp_path: Path, database_url: str, gcs_server: Any, gcs_bucket: str
) -> Iterator[dict[str, Any]]:
    """A stack of this test's own: for the tests that stop it, break its database or count
    everything it did (its logs, its metrics)."""
    with running_stack(tmp_path, database_url, gcs_server.url, gcs_bucket) as running:
        yield running


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def module_stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sqlite_template: Path,
    gcs_server: Any,
) -> Iterator[dict[str, Any]]:
    """One stack per database for this module's tests that only use it: each leaves it as
    it found it (simulator knobs put back) and checks only what it did itself (its own
    generations, jobs, objects and log lines). Its own database and bucket: the per-test
    `database_url` fixture empties the session's PostgreSQL database meanwhile."""
    tmp_path = tmp_path_factory.mktemp(f"shared-stack-{request.param}")
    bucket = f"genrelay-test-{uuid.uuid4().hex[:12]}"
    gcs_server.create_bucket(bucket)
    with contextlib.ExitStack() as later:
        if request.param == "sqlite":
            shutil.copy(sqlite_template, tmp_path / "genrelay.db")
            database_url = f"sqlite:///{tmp_path / 'genrelay.db'}"
        else:
            database_url = later.enter_context(new_postgres_database())
        yield later.enter_context(running_stack(tmp_path, database_url, gcs_server.url, bucket))


@pytest.fixture
def shared_stack(module_stack: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The module's stack for one test; every process must be alive before and after."""
    module_stack["stack"].check_alive()
    yield module_stack
    module_stack["stack"].check_alive()


@contextlib.contextmanager
def simulator_knobs(stack: dict[str, Any], **knobs: Any) -> Iterator[None]:
    """The simulator's knobs set as given, then put back as they were."""
    before = requests.get(f"{stack['sim']}/_sim/settings", timeout=5).json()
    set_simulator(stack["sim"], **knobs)
    try:
        yield
    finally:
        set_simulator(stack["sim"], **{knob: before[knob] for knob in knobs})


def job_callbacks(stack: dict[str, Any], job: str) -> list[dict[str, Any]]:
    """The callbacks the simulator sent (or lost) for one job."""
    found = requests.get(f"{stack['sim']}/_sim/jobs/{job}", timeout=5).json()
    return list(found["callbacks"])


def delivered(callback: dict[str, Any]) -> bool:
    status = callback["status_code"]
    return status is not None and 200 <= status < 300


def bucket_objects(stack: dict[str, Any]) -> set[str]:
    listing = requests.get(
        f"{stack['gcs']}/storage/v1/b/{stack['bucket']}/o",
        params={"maxResults": 10000},
        timeout=10,
    ).json()
    return {item["name"] for item in listing.get("items", [])}


# What the simulator makes of each seed example (docs/simulator.md: a url input counts as a
# 1024x1024 source; generation requests default to PNG, others to JPEG).
EXPECTED = {
    "text_only": ((2048, 1024), "image/png"),
    "text_only_fantasy": ((2048, 1024), "image/png"),
    "text_only_premium": ((2048, 1024), "image/png"),
    "generate_background": ((1024, 1024), "image/png"),
    "face": ((1024, 1024), "image/png"),
    "control": ((1024, 1024), "image/png"),
    "generative_upscale": ((3000, 3000), "image/jpeg"),
}


def wait_for_status(stack: dict[str, Any], generation_id: str, timeout: float = 30) -> Any:
    """The generation once it is finished."""
    found: dict[str, Any] = {}

    def finished() -> bool:
        response = requests.get(
            f"{stack['base']}/v1/generations/{generation_id}", headers=stack["auth"], timeout=5
        )
        found.update(response.json())
        return found["status"] in ("succeeded", "failed", "canceled")

    wait_for(finished, timeout, f"generation {generation_id} to finish")
    return found


def read_object(stack: dict[str, Any], uri: str) -> bytes:
    """An object's bytes, read from fake-gcs-server over its JSON API."""
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    response = requests.get(
        f"{stack['gcs']}/storage/v1/b/{bucket}/o/{quote(name, safe='')}",
        params={"alt": "media"},
        timeout=10,
    )
    response.raise_for_status()
    return response.content


def test_every_seed_example_is_called_back_and_stored_in_gcs(
    shared_stack: dict[str, Any],
) -> None:
    stack = shared_stack
    base, auth = stack["base"], stack["auth"]
    created = {}
    jobs = {}
    for name in EXPECTED:
        example = seed_examples()[name]
        response = requests.post(
            f"{base}/v1/generations", json={"input": example}, headers=auth, timeout=30
        )
        assert response.status_code == 202, (name, response.text)
        body = response.json()
        assert body["status"] == "processing", name
        job = requests.get(f"{stack['sim']}/_sim/jobs/{body['upstream']['job']}", timeout=5).json()
        sent = dict(job["request"])
        assert sent.pop("webhooks") == {
            "complete": callback_url(stack["base"], CALLBACK_SECRET, body["id"])
        }
        assert sent == example
        created[name] = body["id"]
        jobs[name] = body["upstream"]["job"]
    for name, generation_id in created.items():
        done = wait_for_status(stack, generation_id)
        assert done["status"] == "succeeded", (name, done["error"])
        result = done["result"]
        (width, height), content_type = EXPECTED[name]
        data = read_object(stack, result["uri"])
        assert Image.open(io.BytesIO(data)).size == (width, height), name
        assert (result["width"], result["height"]) == (width, height)
        assert result["content_type"] == content_type
        assert result["crc32c"] == crc32c_base64(data)
        assert result["size"] == len(data)
    # The callback path, not polling: each job's one callback was delivered (and no other).
    for name, job in jobs.items():
        callbacks = job_callbacks(stack, job)
        assert [delivered(c) for c in callbacks] == [True], (name, callbacks)


def test_duplicate_callbacks_store_one_object(shared_stack: dict[str, Any]) -> None:
    stack = shared_stack
    objects_before = bucket_objects(stack)
    with simulator_knobs(stack, duplicate_callback_rate=1.0):
        body = requests.post(
            f"{stack['base']}/v1/generations",
            json={"input": seed_examples()["text_only"]},
            headers=stack["auth"],
            timeout=30,
        ).json()
    job = body["upstream"]["job"]
    assert job, body
    done = wait_for_status(stack, body["id"])
    assert done["status"] == "succeeded"

    # The duplicate may still be on its way when the first has made the generation succeed.
    wait_for(lambda: len(job_callbacks(stack, job)) >= 2, 30, "the duplicate callback to be sent")
    callbacks = job_callbacks(stack, job)
    assert [delivered(c) for c in callbacks] == [True, True], callbacks
    # One object: the only one this test added to the bucket.
    assert bucket_objects(stack) - objects_before == {done["result"]["uri"].split("/", 3)[3]}


def test_the_worker_process_submits_what_the_inline_attempt_could_not(
    shared_stack: dict[str, Any],
) -> None:
    stack = shared_stack
    base, auth = stack["base"], stack["auth"]
    with simulator_knobs(stack, upstream_error_rate=1.0):
        body = requests.post(
            f"{base}/v1/generations",
            json={"input": seed_examples()["text_only"]},
            headers=auth,
            timeout=30,
        ).json()
        assert body["status"] == "queued"

    def processing() -> bool:
        current = requests.get(f"{base}/v1/generations/{body['id']}", headers=auth, timeout=5)
        return bool(current.json()["status"] in ("processing", "succeeded"))

    wait_for(processing, 30, "the worker to submit the generation")
    assert wait_for_status(stack, body["id"])["status"] == "succeeded"


def test_worker_and_web_stop_cleanly_on_sigterm(stack: dict[str, Any]) -> None:
    processes = stack["stack"].processes
    for name in ("worker", "serve"):
        processes[name].send_signal(signal.SIGTERM)
        assert processes[name].wait(timeout=30) == 0, stack["stack"].logs()


def test_the_worker_process_schedules_housekeeping_and_sweeps_at_once(
    shared_stack: dict[str, Any],
) -> None:
    stack = shared_stack
    store = Store(stack["database_url"])
    task: dict[str, Any] = {}

    def swept() -> bool:
        with store.read() as session:
            row = session.get(Task, TASK_ID)
            if row is not None:
                task.update(status=row.status, run_at=row.run_at, kind=row.kind)
        # After its first sweep it waits, pending, for the next one an hour later.
        return bool(task) and task["run_at"] > utcnow() + dt.timedelta(minutes=50)

    try:
        wait_for(swept, 20, "the first housekeeping sweep")
    finally:
        store.dispose()
    assert (task["kind"], task["status"]) == ("housekeeping", "pending")


def _refuse_writes(database_url: str) -> Callable[[], None]:
    """Make two writes fail in the database itself: every subscription insert, and recording
    a result URL containing `refuse-me`. Returns what undoes it (the PostgreSQL database is
    shared by the session's tests)."""
    engine = sa.create_engine(database_url)
    if engine.dialect.name == "sqlite":
        statements = [
            "CREATE TRIGGER e2e_refuse_subscriptions BEFORE INSERT ON subscriptions"
            " BEGIN SELECT RAISE(ABORT, 'refused by the e2e test'); END",
            "CREATE TRIGGER e2e_refuse_source BEFORE UPDATE ON generations"
            " WHEN instr(NEW.source_url, 'refuse-me') > 0"
            " BEGIN SELECT RAISE(ABORT, 'refused by the e2e test'); END",
        ]
        undo = ["DROP TRIGGER e2e_refuse_subscriptions", "DROP TRIGGER e2e_refuse_source"]
    else:
        statements = [
            "CREATE FUNCTION e2e_refuse() RETURNS trigger LANGUAGE plpgsql"
            " AS $$ BEGIN RAISE EXCEPTION 'refused by the e2e test'; END $$",
            "CREATE TRIGGER e2e_refuse_subscriptions BEFORE INSERT ON subscriptions"
            " FOR EACH ROW EXECUTE FUNCTION e2e_refuse()",
            "CREATE TRIGGER e2e_refuse_source BEFORE UPDATE ON generations FOR EACH ROW"
            " WHEN (position('refuse-me' in NEW.source_url) > 0) EXECUTE FUNCTION e2e_refuse()",
        ]
        undo = [
            "DROP TRIGGER e2e_refuse_subscriptions ON subscriptions",
            "DROP TRIGGER e2e_refuse_source ON generations",
            "DROP FUNCTION e2e_refuse()",
        ]
    with engine.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)

    def restore() -> None:
        with engine.begin() as connection:
            for statement in undo:
                connection.exec_driver_sql(statement)
        engine.dispose()

    return restore


def test_no_secret_reaches_the_logs(stack: dict[str, Any]) -> None:
    base, auth = stack["base"], stack["auth"]
    ids = []
    for _ in range(3):
        body = requests.post(
            f"{base}/v1/generations",
            json={"input": seed_examples()["face"]},
            headers=auth,
            timeout=30,
        ).json()
        ids.append(body["id"])

    def called_back() -> bool:
        stats = requests.get(f"{stack['sim']}/_sim/stats", timeout=5).json()
        return bool(stats["callbacks_sent"] >= 3)

    wait_for(called_back, 30, "the simulator's callbacks")
    # Error paths: a database error while a whsec_ secret is a bound value, and a 500 on a
    # callback (its URL carries the token).
    set_simulator(stack["sim"], lost_callback_rate=1.0)  # this callback is ours to send
    pending = requests.post(
        f"{base}/v1/generations", json={"input": seed_examples()["face"]}, headers=auth, timeout=30
    ).json()
    assert pending["upstream"]["job"], pending
    ids.append(pending["id"])
    restore = _refuse_writes(stack["database_url"])
    try:
        subscription = requests.post(
            f"{base}/v1/subscriptions",
            json={"url": "http://127.0.0.1:9/hook"},
            headers=auth,
            timeout=30,
        )
        assert subscription.status_code == 500, subscription.text
        callback = requests.post(
            callback_url(base, CALLBACK_SECRET, pending["id"]),
            json={"job": pending["upstream"]["job"], "result_url": f"{stack['sim']}/refuse-me.png"},
            timeout=30,
        )
        assert callback.status_code == 500, callback.text
    finally:
        restore()
    stack["stack"].stop_all()
    logs = stack["stack"].logs(tail=None)
    assert "/v1/callbacks/deepimage/" in logs  # the callbacks were logged...
    assert "refused by the e2e test" in logs  # ...and both errors, with their tracebacks...
    assert "unhandled error on POST /v1/subscriptions" in logs
    assert "unhandled error on POST /v1/callbacks/deepimage/" in logs
    secrets = [CALLBACK_SECRET, auth["Authorization"].split()[1], "sim-key", "whsec_"]
    secrets += [callback_token(CALLBACK_SECRET, gen_id) for gen_id in ids]
    for secret in secrets:  # ...without any credential
        assert secret not in logs


def test_the_worker_process_delivers_signed_notifications_in_order(
    shared_stack: dict[str, Any],
) -> None:
    from service.devtools.inbox import InboxServer

    stack = shared_stack
    base, auth = stack["base"], stack["auth"]
    secret = requests.get(f"{base}/v1/webhooks/default/secret", headers=auth, timeout=5).json()
    with InboxServer([secret["secret"]], out=io.StringIO()) as inbox:
        body = requests.post(
            f"{base}/v1/generations",
            json={"input": seed_examples()["text_only"], "webhook": inbox.url + "/"},
            headers=auth,
            timeout=30,
        ).json()
        assert wait_for_status(stack, body["id"])["status"] == "succeeded"

        def both_arrived() -> bool:
            return len(requests.get(f"{inbox.url}/events", timeout=5).json()) >= 2

        wait_for(both_arrived, 30, "both notifications")
        received = requests.get(f"{inbox.url}/events", timeout=5).json()
    assert [(e["type"], e["verified"]) for e in received] == [
        ("generation.processing", True),
        ("generation.succeeded", True),
    ]


def test_metrics_add_up_across_web_processes_and_the_worker_serves_its_own(
    stack: dict[str, Any],
) -> None:
    base, auth = stack["base"], stack["auth"]
    ids = []
    for _ in range(6):  # spread over both gunicorn processes
        ids.append(
            requests.post(
                f"{base}/v1/generations",
                json={"input": seed_examples()["text_only"]},
                headers=auth,
                timeout=30,
            ).json()["id"]
        )
    for generation_id in ids:
        assert wait_for_status(stack, generation_id)["status"] == "succeeded"
    web = requests.get(f"{base}/metrics", timeout=10).text
    [count] = [
        line
        for line in web.splitlines()
        if line.startswith("genrelay_http_request_duration_seconds_count")
        and 'method="POST"' in line
        and 'route="/v1/generations"' in line
    ]
    assert float(count.rsplit(" ", 1)[1]) == 6  # every process's requests, whoever answers
    assert 'genrelay_generations{status="succeeded"} 6.0' in web
    worker = requests.get(stack["worker_metrics"], timeout=10).text
    # A store runs in the web process that took the callback when it has an idle inline
    # thread, else in the worker: each is counted once, by whichever ran it.
    for sample in (
        'genrelay_tasks_total{kind="store",outcome="done"}',
        'genrelay_gcs_upload_duration_seconds_count{outcome="stored"}',
    ):
        assert _sample(web, sample) + _sample(worker, sample) == 6, sample


def _sample(text: str, name: str) -> float:
    """The value of the metric line starting with `name` (0 when absent)."""
    values = [
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
    ]
    return sum(values)


def test_access_lines_are_json(shared_stack: dict[str, Any]) -> None:
    stack = shared_stack
    request_id = f"abc-{uuid.uuid4().hex[:12]}"
    requests.get(f"{stack['base']}/healthz", headers={"X-Request-Id": request_id}, timeout=5)
    access: list[dict[str, Any]] = []

    def logged() -> bool:
        text = (stack["stack"].tmp_path / "serve.log").read_text()
        lines = text[: text.rfind("\n") + 1].splitlines()  # whole lines only
        access[:] = [json.loads(line) for line in lines if '"gunicorn.access"' in line]
        return any(a.get("request_id") == request_id for a in access)

    wait_for(logged, 10, "the access line")
    [health] = [a for a in access if a.get("request_id") == request_id]
    assert health["httpRequest"]["requestUrl"] == "/healthz"
    assert health["httpRequest"]["status"] == 200
    assert health["severity"] == "INFO"
