"""The store task after an attempt that did not end cleanly: nothing stored is left behind
unrecorded, a passing GCS error is retried, and a generation that fails names the side that
failed.

The GCS emulator holds the objects; an attempt "uploads, then loses GCS's answer" (the object
is in the bucket, the attempt fails as a transient GCS error, nothing recorded), as a process
killed right after its upload would leave it.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa

from service.adapters.blobstore import GcsBlobStore, TransientBlobError
from service.app import create_app
from service.bootstrap import build_services
from service.config import Config
from service.devtools.fakes import FakeBlobStore
from service.models import Task, utcnow
from service.runtime.kinds import STORE
from service.runtime.queue import RetryPolicy
from service.runtime.worker import Worker
from tests.gcp_helpers import cannot_sign_for_good
from tests.helpers import Receiver, drain, set_simulator
from tests.integration.test_completion import TEXT_ONLY, app_on, create, objects, tasks_of


def _stored_but_not_recorded(services: Any, client: Any, auth: dict[str, str]) -> str:
    """A generation whose first store attempt put the object in the bucket and then failed
    before recording it; its id."""
    made = create(client, auth, {"input": TEXT_ONLY})
    real = services.blobs.write_new

    def upload_then_lose_the_answer(*args: Any, **kwargs: Any) -> Any:
        services.blobs.write_new = real
        real(*args, **kwargs)
        raise TransientBlobError("uploading: ConnectionError")

    services.blobs.write_new = upload_then_lose_the_answer
    worker = Worker(services.runner, threads=1)
    deadline = time.monotonic() + 15
    while not any(t.last_error for t in tasks_of(services, STORE)):
        assert time.monotonic() < deadline, "the store task never tried"
        worker.run_once()
        time.sleep(0.05)
    assert len(objects(services)) == 1
    return str(made["id"])


def _store_task_due_now(services: Any) -> None:
    with services.store.transaction() as session:
        session.execute(sa.update(Task).where(Task.kind == STORE).values(run_at=utcnow()))


def test_a_cancel_between_store_attempts_leaves_nothing_in_the_bucket(
    config: Config, make_client: Any
) -> None:
    services, client, auth = make_client(config)
    generation_id = _stored_but_not_recorded(services, client, auth)
    canceled = client.post(f"/v1/generations/{generation_id}/cancel", headers=auth)
    assert canceled.json["status"] == "canceled"
    _store_task_due_now(services)
    drain(services)
    assert objects(services) == {}


def test_a_retry_that_fails_for_good_deletes_what_an_earlier_attempt_stored(
    config: Config, make_client: Any, simulator: Any
) -> None:
    services, client, auth = make_client(config)
    generation_id = _stored_but_not_recorded(services, client, auth)
    set_simulator(simulator.url, result_ttl=0.0)  # Deep-Image's link is gone by the retry
    _store_task_due_now(services)
    drain(services)
    shown = client.get(f"/v1/generations/{generation_id}", headers=auth).json
    assert (shown["status"], shown["error"]["code"]) == ("failed", "result_unavailable")
    assert objects(services) == {}


def test_a_generation_failed_while_its_result_is_copied_leaves_no_object(
    config: Config, make_client: Any
) -> None:
    from service.domain import ErrorCode
    from service.generations.lifecycle import fail_generation

    services, client, auth = make_client(config)  # polling only
    generation = create(client, auth, {"input": TEXT_ONLY})
    write_new = services.blobs.write_new

    def fail_then_write(*args: Any, **kwargs: Any) -> Any:
        services.blobs.write_new = write_new
        with services.store.transaction() as session:  # as a poll's verdict would
            fail_generation(session, generation["id"], ErrorCode.UPSTREAM_JOB_FAILED, "failed")
        return write_new(*args, **kwargs)

    services.blobs.write_new = fail_then_write
    drain(services)
    assert services.blobs.write_new is write_new  # the copy started before the failure
    done = client.get(f"/v1/generations/{generation['id']}", headers=auth).json
    assert (done["status"], done["result"]) == ("failed", None)
    assert objects(services) == {}  # written, then deleted by the worker


def test_an_object_of_another_generation_is_never_deleted_as_a_leftover(
    config: Config, make_client: Any
) -> None:
    services, client, auth = make_client(config)
    generation_id = _stored_but_not_recorded(services, client, auth)
    [name] = objects(services)
    # Someone else's object under the same name (the metadata names its generation).
    services.blobs.delete(name)
    services.blobs.write_new(
        name, iter_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64), content_type="image/png",
        metadata={"generation_id": "gen_someone_else"}, size=72,
    )  # fmt: skip
    client.post(f"/v1/generations/{generation_id}/cancel", headers=auth)
    _store_task_due_now(services)
    drain(services)
    assert list(objects(services)) == [name]


def test_an_earlier_copy_of_our_own_with_other_bytes_is_replaced(
    config: Config, make_client: Any
) -> None:
    services, client, auth = make_client(config)
    generation_id = _stored_but_not_recorded(services, client, auth)
    [(name, whole)] = objects(services).items()
    # What an attempt cut short would have left: a prefix of the image, marked as ours.
    services.blobs.delete(name)
    services.blobs.write_new(
        name, iter_bytes(whole[:64]), content_type="image/png",
        metadata={"generation_id": generation_id}, size=64,
    )  # fmt: skip
    _store_task_due_now(services)
    drain(services)
    shown = client.get(f"/v1/generations/{generation_id}", headers=auth).json
    assert shown["status"] == "succeeded", shown["error"]
    assert objects(services) == {name: whole}


def test_an_existing_object_that_cannot_be_read_is_retried_not_a_conflict(
    config: Config, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    services, client, auth = make_client(config)
    generation_id = _stored_but_not_recorded(services, client, auth)
    real_stat = GcsBlobStore.stat

    def stat_times_out(self: GcsBlobStore, name: str) -> Any:
        raise TransientBlobError(f"reading gs://{self.bucket}/{name}: ReadTimeout")

    monkeypatch.setattr(GcsBlobStore, "stat", stat_times_out)  # GCS still failing a moment
    _store_task_due_now(services)
    [claimed] = services.queue.claim_due_tasks(kinds=[STORE])
    services.runner.execute(claimed)
    [task] = tasks_of(services, STORE)
    assert task.status == "pending"
    assert task.last_error is not None and "could not be read" in task.last_error
    monkeypatch.setattr(GcsBlobStore, "stat", real_stat)
    _store_task_due_now(services)
    drain(services)
    shown = client.get(f"/v1/generations/{generation_id}", headers=auth).json
    assert shown["status"] == "succeeded", shown["error"]  # the same bytes: recorded as stored


def test_a_result_host_that_never_answers_fails_as_result_unavailable(
    config: Config, store: Any, blobs: Any, simulator: Any
) -> None:
    receiver = Receiver([503])  # the result host, always down
    set_simulator(simulator.url, public_url=receiver.url.removesuffix("/hook"))
    services = build_services(
        config, store=store, blobs=blobs,
        policies={STORE: RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02)},
    )  # fmt: skip
    client = create_app(config, services=services).test_client()
    auth = {"Authorization": "Bearer " + services.api_keys.create("acme")}
    try:
        made = create(client, auth, {"input": TEXT_ONLY})
        drain(services)
        shown = client.get(f"/v1/generations/{made['id']}", headers=auth).json
    finally:
        receiver.stop()
        services.deepimage.close()
        services.downloads.close()
    assert len(receiver.requests) == 3  # GCS never came into it
    assert shown["error"] == {
        "code": "result_unavailable",
        "message": "the result could not be downloaded after 3 attempts",
    }


def test_a_signing_error_that_may_pass_is_a_503_not_a_501(
    config: Config, store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    services, client, auth = app_on(config, store, FakeBlobStore(config.gcs_bucket, can_sign=True))
    try:
        made = create(client, auth, {"input": TEXT_ONLY})
        drain(services)
        assert client.get(f"/v1/generations/{made['id']}/result", headers=auth).status_code == 302

        def iam_unavailable(self: FakeBlobStore, name: str, expires_in: Any) -> str:
            raise TransientBlobError("signing a URL: the IAM signBytes API answered 503")

        monkeypatch.setattr(FakeBlobStore, "signed_url", iam_unavailable)
        answer = client.get(f"/v1/generations/{made['id']}/result", headers=auth)
    finally:
        services.deepimage.close()
        services.downloads.close()
    assert answer.status_code == 503
    assert answer.mimetype == "application/problem+json"
    assert answer.headers["Retry-After"] == "5"
    assert "IAM" not in answer.get_data(as_text=True)


@pytest.mark.parametrize("signer", ["refused by IAM", "cannot refresh"])
def test_credentials_that_cannot_sign_for_good_are_a_501(
    config: Config, make_client: Any, monkeypatch: pytest.MonkeyPatch, signer: str
) -> None:
    services, client, auth = make_client(config)
    made = create(client, auth, {"input": TEXT_ONLY})
    drain(services)
    cannot_sign_for_good(monkeypatch, services.blobs, signer)
    answer = client.get(f"/v1/generations/{made['id']}/result", headers=auth)
    assert answer.status_code == 501
    assert answer.json["type"].endswith("/cannot-sign")


def iter_bytes(data: bytes) -> Any:
    import io

    return io.BytesIO(data)
