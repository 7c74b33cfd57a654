"""The composition root: builds every adapter and service from a Config, in one place.

The web app (`service.app.create_app`) and the worker (`genrelay worker`) both start here;
tests pass their own adapters (a simulator-backed client, a scratch database, a fake-gcs
bucket) instead.
"""

from __future__ import annotations

import dataclasses

import requests

from service.auth import ApiKeys
from service.batches import BatchService, CancelBatchHandler
from service.blobstore import BlobStore, GcsBlobStore
from service.completion import CompletionService, PollHandler
from service.config import Config
from service.deepimage import DeepImageClient
from service.delivery import DeliverHandler
from service.generations import GenerationService
from service.line import Line, LineHandler
from service.oidc import TokenVerifier
from service.ratelimit import BAD_KEY_RATE, BadKeyLimiter, RateLimiter
from service.result_access import ExpireResultHandler, ResultAccess
from service.results import StoreHandler, download_session
from service.runtime import kinds
from service.runtime.housekeeping import HousekeepingHandler
from service.runtime.inline import InlineTasks
from service.runtime.queue import RetryPolicy, TaskQueue
from service.runtime.runner import TaskRunner
from service.ssrf import URLPolicy, pinned_session, timed_resolver
from service.store import Store
from service.submission import SubmitHandler
from service.subscriptions import NotificationService
from service.triggers import TriggerService

# A webhook URL given in a request is resolved while the client waits: not for long.
REQUEST_DNS_TIMEOUT = 2.0


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
    policy = URLPolicy(allow_private=config.allow_private_webhooks)
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
    generations = GenerationService(store, queue, line, runner, blobs, config, request_policy)
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
            InlineTasks(runner, threads=inline_store_threads) if inline_store_threads else None,
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
