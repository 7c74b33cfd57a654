"""The composition root: builds every adapter and service from a Config, in one place.

The web app (`service.app.create_app`) and the worker (`genrelay worker`) both start here;
tests pass their own adapters (a simulator-backed client, a scratch database) instead.
"""

from __future__ import annotations

import dataclasses

from service.auth import ApiKeys
from service.config import Config
from service.deepimage import DeepImageClient
from service.generations import GenerationService
from service.store import Store
from service.submission import SUBMIT, SubmitHandler
from service.tasks import RetryPolicy, TaskQueue
from service.worker import TaskRunner

# Submit: 10 attempts over roughly 40 minutes before the generation fails as unavailable.
SUBMIT_POLICY = RetryPolicy(max_attempts=10, base_delay=2.0, max_delay=600.0, max_age=6 * 3600)


@dataclasses.dataclass
class Services:
    config: Config
    store: Store
    deepimage: DeepImageClient
    queue: TaskQueue
    runner: TaskRunner
    generations: GenerationService
    api_keys: ApiKeys

    def close(self) -> None:
        self.deepimage.close()
        self.store.dispose()


def build_services(
    config: Config,
    *,
    store: Store | None = None,
    deepimage: DeepImageClient | None = None,
    policies: dict[str, RetryPolicy] | None = None,
    lease_seconds: float = 300.0,
) -> Services:
    """Wire the service graph for `config`; any adapter may be passed in instead."""
    store = store or Store(config.database_url)
    deepimage = deepimage or DeepImageClient(
        config.deepimage_url, config.deepimage_api_key, timeout=config.deepimage_timeout
    )
    queue = TaskQueue(
        store, policies={SUBMIT: SUBMIT_POLICY, **(policies or {})}, lease_seconds=lease_seconds
    )
    runner = TaskRunner(queue, {SUBMIT: SubmitHandler(store, deepimage, config)})
    return Services(
        config=config,
        store=store,
        deepimage=deepimage,
        queue=queue,
        runner=runner,
        generations=GenerationService(store, queue, runner),
        api_keys=ApiKeys(store),
    )
