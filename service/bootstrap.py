"""The composition root: builds every adapter and service from a Config, in one place.

The web app (`service.app.create_app`) and the worker (`genrelay worker`) both start here;
tests pass their own adapters (a simulator-backed client, a scratch database, a fake-gcs
bucket) instead.
"""

from __future__ import annotations

import dataclasses

import requests

from service.adapters.blobstore import BlobStore, GcsBlobStore
from service.adapters.deepimage import DeepImageClient
from service.adapters.oidc import TokenVerifier
from service.auth import ApiKeys
from service.config import Config
from service.database import Store
from service.generations.batches import BatchService, CancelBatchHandler
from service.generations.completion import CompletionService
from service.generations.line import Line, LineHandler
from service.generations.poll import PollHandler
from service.generations.result_access import ExpireResultHandler, ResultAccess
from service.generations.service import GenerationService
from service.generations.store import StoreHandler, download_session
from service.generations.submit import SubmitHandler
from service.generations.triggers import TriggerService
from service.notifications.deliver import DeliverHandler
from service.notifications.service import NotificationService
from service.notifications.ssrf import URLPolicy, pinned_session, timed_resolver
from service.ratelimit import BAD_KEY_RATE, BadKeyLimiter, RateLimiter
from service.runtime import kinds
from service.runtime.housekeeping import HousekeepingHandler
from service.runtime.inline import InlineTasks
from service.runtime.queue import RetryPolicy, TaskQueue
from service.runtime.runner import TaskRunner
from service.runtime.worker import BackgroundLeases

# A webhook URL given in a request is resolved while the client waits: not for long.
REQUEST_DNS_TIMEOUT = 2.0
WEBHOOK_DNS_TIMEOUT = 5.0  # seconds for a delivery's lookup (of its 15 s in all)


@dataclasses.dataclass
class Services:
    config: Config
    store: Store
    deepimage: DeepImageClient
    blobs: BlobStore
    queue: TaskQueue
    line: Line
    runner: TaskRunner
    generations: GenerationService
    batches: BatchService
    completion: CompletionService
    notifications: NotificationService
    api_keys: ApiKeys
    rate_limiter: RateLimiter
    bad_keys: BadKeyLimiter
    results: ResultAccess
    triggers: TriggerService
    downloads: requests.Session
    webhooks: requests.Session

    def close(self) -> None:
        self.triggers.verifier.close()
        self.deepimage.close()
        self.downloads.close()
        self.webhooks.close()
        self.store.dispose()


def build_services(
    config: Config,
    *,
    store: Store | None = None,
    deepimage: DeepImageClient | None = None,
    blobs: BlobStore | None = None,
    policies: dict[str, RetryPolicy] | None = None,
    inline_store_threads: int = 0,
) -> Services:
    """Wire the service graph for `config`; any adapter may be passed in instead.

    `inline_store_threads`: in a web process, how many accepted callbacks may have their
    `store` run by the process itself at once (service/runtime/inline.py); 0: all go to the
    workers.
    """
    store = store or Store(config.database_url)
    deepimage = deepimage or DeepImageClient(
        config.deepimage_url, config.deepimage_api_key, timeout=config.deepimage_timeout
    )
    blobs = blobs or GcsBlobStore.from_environment(
        config.gcs_bucket, signing_service_account=config.gcs_signing_account
    )
    queue = TaskQueue(
        store,
        policies={**kinds.retry_policies(config), **(policies or {})},
        lease_seconds=config.task_lease,
        short_leases=kinds.SHORT_LEASES,
    )
    line = Line(store, queue, configured_limit=config.upstream_concurrency)
    line.install()
    # Results are fetched as carefully as webhooks: allowed hosts, pinned, checked addresses.
    downloads = download_session(config)
    # A delivery's lookup is bounded too: its Deadline cannot cut getaddrinfo.
    policy = URLPolicy(
        allow_private=config.allow_private_webhooks,
        resolver=timed_resolver(WEBHOOK_DNS_TIMEOUT),
    )
    webhooks = pinned_session(policy)
    request_policy = URLPolicy(
        allow_private=config.allow_private_webhooks,
        resolver=timed_resolver(REQUEST_DNS_TIMEOUT),
    )
    batches = BatchService(store, queue, line, request_policy)
    runner = TaskRunner(
        queue,
        {
            kinds.SUBMIT: SubmitHandler(store, queue, deepimage, config, line, blobs=blobs),
            kinds.STORE: StoreHandler(store, queue, deepimage, blobs, config, http=downloads),
            kinds.POLL: PollHandler(store, queue, deepimage, config),
            kinds.DELIVER: DeliverHandler(store, webhooks),
            kinds.HOUSEKEEPING: HousekeepingHandler(store),
            kinds.LINE: LineHandler(line),
            kinds.CANCEL_BATCH: CancelBatchHandler(batches),
            kinds.EXPIRE_RESULT: ExpireResultHandler(store, blobs),
        },
    )
    # One renewer per process of the leases its web requests hold (intake's first submit, the
    # inline stores).
    leases = BackgroundLeases(queue)
    generations = GenerationService(
        store, queue, line, runner, blobs, config, request_policy, leases
    )
    return Services(
        config=config,
        store=store,
        deepimage=deepimage,
        blobs=blobs,
        queue=queue,
        line=line,
        runner=runner,
        generations=generations,
        batches=batches,
        completion=CompletionService(
            store,
            queue,
            config,
            InlineTasks(runner, threads=inline_store_threads, leases=leases)
            if inline_store_threads
            else None,
        ),
        notifications=NotificationService(store, config, request_policy),
        api_keys=ApiKeys(store),
        rate_limiter=RateLimiter(config.rate_limit, config.rate_limit_burst),
        # Off with the per-key limit (GENRELAY_RATE_LIMIT=0).
        bad_keys=BadKeyLimiter(rate=BAD_KEY_RATE if config.rate_limit > 0 else 0),
        results=ResultAccess(store, blobs, config),
        triggers=TriggerService(
            store, generations, config, request_policy, TokenVerifier(config.oidc_certs_url)
        ),
        downloads=downloads,
        webhooks=webhooks,
    )
