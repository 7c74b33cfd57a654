"""Where a tenant's results go, links to them, and how long they are kept.

- Output: a tenant's `output` setting (`gs://bucket/prefix`) or the service's
  GENRELAY_GCS_BUCKET/GENRELAY_GCS_PREFIX. The `store` task writes there
  (service/generations/store.py).
- Links: `result.url` is a V4 signed GET URL. Shown resources sign a fresh one (valid
  GENRELAY_SIGNED_URL_TTL); notifications carry one signed when their deliveries are written
  (valid for two whole retry schedules, see Config.notification_url_ttl), since every attempt
  sends the same stored bytes; `GET /v1/generations/{id}/result` redirects to a fresh one.
- Retention: a generation keeps `retention_seconds` (its request's `retention`, else its
  tenant's). When it succeeds, an `expire_result` task is queued that far ahead; it sets
  `result_expired_at` (shown as `result.expired_at`), then deletes the object: in that order,
  so no answer links to an object already gone. `DELETE /v1/generations/{id}/result` does the
  same at once. The generation row stays. An object stored for a generation canceled while
  it was written is deleted too, by an `expire_result` task that names it.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.adapters.blobstore import (
    BlobError,
    BlobStore,
    PermanentBlobError,
    TransientBlobError,
)
from service.adapters.gcs_urls import parse_gs_url
from service.config import Config
from service.database import Store
from service.domain import GenerationStatus
from service.errors import Conflict, NotFound, ServiceError, Unavailable
from service.models import Generation, utcnow
from service.runtime.kinds import EXPIRE_RESULT
from service.runtime.outcomes import DONE, Failed, Later, Outcome
from service.runtime.queue import ClaimedTask, TaskQueue, insert_task
from service.tenants import TenantSettings

log = logging.getLogger("genrelay.result_access")


class ResultGone(ServiceError):
    status = 410
    slug = "result-expired"
    title = "The result has been deleted"


class CannotSign(ServiceError):
    status = 501
    slug = "cannot-sign"
    title = "No signed URL can be made"


def output_location(config: Config, settings: TenantSettings) -> tuple[str, str]:
    """(bucket, prefix) where the tenant's results are stored."""
    if settings.output:
        parsed = parse_gs_url(settings.output, object_required=False)
        if parsed is not None:
            return parsed[0], parsed[1].strip("/")
    return config.gcs_bucket, config.gcs_prefix


def sign_result(blobs: BlobStore, uri: str | None, ttl: float) -> str | None:
    """A V4 GET URL of the stored result at `uri`; None where it cannot be made now."""
    try:
        return _signed(blobs, uri, ttl)
    except BlobError as exc:
        # Signing through IAM can fail for a moment; the result stays readable by URI.
        log.warning("could not sign a URL for %s: %s", uri, exc.message)
        return None


def _signed(blobs: BlobStore, uri: str | None, ttl: float) -> str | None:
    """A V4 GET URL of the object at `uri`; None where the credentials cannot sign (or `uri`
    names no object). BlobError when signing failed."""
    parsed = parse_gs_url(uri) if isinstance(uri, str) else None
    if parsed is None:
        return None
    bucket, name = parsed
    return blobs.for_bucket(bucket).signed_url(name, dt.timedelta(seconds=ttl))


def schedule_expiry(session: Session, queue: TaskQueue, generation: Generation) -> None:
    """Queue the deletion of a just-stored result when its generation has a retention."""
    if generation.retention_seconds is not None:
        queue.enqueue(
            session,
            EXPIRE_RESULT,
            {},
            generation_id=generation.id,
            delay=float(generation.retention_seconds),
        )


class ResultAccess:
    """`GET` (a redirect to a signed URL) and `DELETE` of a generation's stored result."""

    def __init__(self, store: Store, blobs: BlobStore, config: Config) -> None:
        self.store = store
        self.blobs = blobs
        self.config = config

    def link(self, tenant_id: str, generation_id: str) -> str:
        """A signed URL of the stored result, made now. Unavailable (503) when signing fails
        for a moment (through IAM on Cloud Run); CannotSign (501) when the credentials cannot
        sign at all."""
        generation = self._stored_result(tenant_id, generation_id)
        assert generation.result is not None
        uri = generation.result.get("uri")
        url = None
        try:
            url = _signed(self.blobs, uri, self.config.signed_url_ttl)
        except TransientBlobError as exc:
            log.warning("could not sign a URL for %s: %s", uri, exc.message)
            raise Unavailable(
                "the result's URL could not be signed just now; try again",
                headers={"Retry-After": "5"},
            ) from None
        except PermanentBlobError as exc:  # e.g. IAM refuses: no signBlob permission
            log.error("could not sign a URL for %s: %s", uri, exc.message)
        if url is None:
            raise CannotSign(
                "genrelay's credentials cannot sign URLs here (set GENRELAY_GCS_SIGNING_ACCOUNT "
                "on Cloud Run, or use a service-account key); the result is at "
                f"{generation.result.get('uri')}"
            )
        return url

    def delete(self, tenant_id: str, generation_id: str) -> None:
        """Delete the stored object now; deleting an expired result again is harmless."""
        try:
            self._stored_result(tenant_id, generation_id)
        except ResultGone:
            return
        expire(self.store, self.blobs, generation_id)

    def _stored_result(self, tenant_id: str, generation_id: str) -> Generation:
        with self.store.read() as session:
            generation = session.get(Generation, generation_id)
        if generation is None or generation.tenant_id != tenant_id:
            raise NotFound(f"no generation {generation_id!r}")
        if generation.result_expired_at is not None:
            raise ResultGone(
                f"the result of {generation_id} was deleted at "
                f"{generation.result_expired_at.isoformat()}"
            )
        if generation.status != GenerationStatus.SUCCEEDED or not generation.result:
            raise Conflict(f"generation {generation_id} has no stored result ({generation.status})")
        return generation


ORPHAN = "orphan"  # the payload key of an object to delete that no result records


def delete_orphan(session: Session, queue: TaskQueue, generation_id: str, uri: str) -> None:
    """Have the worker delete an object stored for a generation that does not keep it (it
    was canceled while the object was written, or an attempt died before recording it): an
    `expire_result` task naming the object. It deletes the object only if it is there, is
    the generation's (by its metadata) and no result records it."""
    queue.enqueue(session, EXPIRE_RESULT, {ORPHAN: uri}, generation_id=generation_id)


def expire(store: Store, blobs: BlobStore, generation_id: str) -> bool:
    """Mark the generation's result expired, then delete its object; False if nothing was
    left to delete.

    Marked first, so that from that commit on nothing shows or signs a link to an object
    about to vanish. The same transaction queues an `expire_result` task a minute ahead: if
    the delete below fails, the worker deletes the object then (a missing object counts as
    deleted, so a second delete is harmless).
    """
    with store.transaction() as session:
        uri = mark_expired(session, generation_id)
        if uri is None:
            return False
        insert_task(session, EXPIRE_RESULT, {}, generation_id, utcnow(), delay=SAFETY_NET)
    try:
        delete_object(blobs, uri)
    except BlobError as exc:
        log.warning("deleting the result of %s failed (the worker tries again): %s",
                    generation_id, exc.message)  # fmt: skip
    return True


SAFETY_NET = 60.0  # seconds before the worker deletes again what DELETE .../result deleted


def delete_object(blobs: BlobStore, uri: str | None) -> None:
    """Delete the stored object at `uri` (a missing object counts as deleted)."""
    parsed = parse_gs_url(uri) if isinstance(uri, str) else None
    if parsed is not None:
        bucket, name = parsed
        blobs.for_bucket(bucket).delete(name)


_STORED = sa.select(Generation.result, Generation.result_expired_at).where(
    Generation.id == sa.bindparam("generation_id")
)


def mark_expired(session: Session, generation_id: str) -> str | None:
    """Record that the generation's result is gone (its object deleted, or about to be);
    the object's URI if this marked it, None if it was marked already or has none."""
    now = utcnow()
    stored = session.execute(_STORED, {"generation_id": generation_id}).first()
    if stored is None or not stored.result or stored.result_expired_at is not None:
        return None
    marked = session.execute(
        sa.update(Generation)
        .where(Generation.id == generation_id, Generation.result_expired_at.is_(None))
        .values(result_expired_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if getattr(marked, "rowcount", 0) != 1:
        return None
    log.info("the result of %s expired", generation_id, extra={"generation_id": generation_id})
    return str(stored.result.get("uri") or "")


class ExpireResultHandler:
    """The `expire_result` task: the retention ran out (or a DELETE's delete is checked)."""

    def __init__(self, store: Store, blobs: BlobStore) -> None:
        self.store = store
        self.blobs = blobs

    def run(self, task: ClaimedTask) -> Outcome:
        """First mark the result expired (the outcome of one run), then delete the object
        (the next run): as in `expire`, nothing shows a link to an object about to vanish.
        A failed delete is retried, the mark already made."""
        generation_id = task.generation_id
        assert generation_id is not None
        with self.store.read_one() as connection:
            stored = connection.execute(_STORED, {"generation_id": generation_id}).first()
        orphan = task.payload.get(ORPHAN)
        if orphan is not None:
            return self._delete_orphan(generation_id, orphan, stored)
        if stored is None or not stored.result:
            return DONE
        if stored.result_expired_at is None:
            return Later(
                0.0,
                "marked expired; the object is deleted next",
                apply=lambda session: mark_expired(session, generation_id),
            )
        return self._delete(stored.result.get("uri"))

    def _delete_orphan(self, generation_id: str, uri: str, stored: Any) -> Outcome:
        """Delete `uri` if it is an object of this generation's (its metadata says so) that
        its result does not record."""
        recorded = stored.result.get("uri") if stored is not None and stored.result else None
        parsed = parse_gs_url(uri)
        if parsed is None or uri == recorded:
            return DONE
        bucket, name = parsed
        try:
            found = self.blobs.for_bucket(bucket).stat(name)
        except TransientBlobError as exc:
            return Failed(f"reading the object to delete: {exc.message}")
        if found is None or found.metadata.get("generation_id") != generation_id:
            return DONE  # nothing there, or not ours to delete
        return self._delete(uri)

    def _delete(self, uri: str | None) -> Outcome:
        try:
            delete_object(self.blobs, uri)
        except TransientBlobError as exc:
            return Failed(f"deleting the result: {exc.message}")
        return DONE

    def on_exhausted(self, task: ClaimedTask, error: str) -> None:
        log.error(
            "the result of %s could not be deleted when its retention ran out: %s",
            task.generation_id,
            error,
            extra={"generation_id": task.generation_id},
        )
        return None
