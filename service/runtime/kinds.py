"""Every kind of task, and how each is retried: the one place both are stated.

A kind's handler lives with the work it does (service/bootstrap.py maps kinds to handlers);
its name and its retry policy live here, so modules that queue a task need not import the
module that runs it.
"""

from __future__ import annotations

import math

from service.config import Config
from service.runtime.queue import RetryPolicy

SUBMIT = "submit"  # forward an admitted generation to Deep-Image
POLL = "poll"  # ask Deep-Image about a job whose callback has not come
STORE = "store"  # stream a finished job's image into GCS
DELIVER = "deliver"  # send one webhook delivery
EXPIRE_RESULT = "expire_result"  # delete a stored result whose retention ran out
CANCEL_BATCH = "cancel_batch"  # cancel what a batch cancel left to do
LINE = "line"  # the line's periodic pass: deadlines, admissions
HOUSEKEEPING = "housekeeping"  # delete expired keys and old finished tasks

# The periodic tasks never fail (a failed pass runs again shortly, see their handlers), so
# their attempts count only leases lost with a dead worker.
PERIODIC = RetryPolicy(max_attempts=1_000_000, max_age=None)

# The line's pass takes moments: a worker that dies mid-pass holds it only this long.
SHORT_LEASES = {LINE: 3.0}


SUBMIT_MAX_DELAY = 600.0  # seconds between a submit's attempts, at most


def retry_policies(config: Config) -> dict[str, RetryPolicy]:
    """Each kind's retry policy under `config`."""
    submit_max_age = config.submit_max_age if config.submit_max_age is not None else 6 * 3600
    return {
        # Retried with backoff, at most 10 minutes apart, until GENRELAY_SUBMIT_MAX_AGE has
        # passed; then the generation fails as unavailable. So an outage of hours (or an
        # account out of requests) fails nothing that waits. The attempts are bounded only
        # for a task that keeps killing its worker: never before the age. A 429 is not an
        # attempt: see the line.
        SUBMIT: RetryPolicy(
            max_attempts=max(10, math.ceil(submit_max_age / (SUBMIT_MAX_DELAY / 2)) + 10),
            base_delay=2.0,
            max_delay=SUBMIT_MAX_DELAY,
            max_age=submit_max_age,
        ),
        # Later (a job still running) is free; attempts count only real failures.
        POLL: RetryPolicy(max_attempts=10, base_delay=5.0, max_delay=600.0, max_age=48 * 3600),
        # GCS or the result URL may be away for a while: about 6 hours.
        STORE: RetryPolicy(max_attempts=20, base_delay=2.0, max_delay=1800.0, max_age=6 * 3600),
        # A delivery's schedule is GENRELAY_WEBHOOK_RETRY_SCHEDULE and nothing else: an attempt
        # per entry, each after its delay (±20 %), whether it failed at the target or in here.
        DELIVER: RetryPolicy.from_schedule(config.webhook_retry_schedule),
        # Its first run may be years out (the retention), so no age limit; deleting may meet
        # a GCS outage of hours.
        EXPIRE_RESULT: RetryPolicy(max_attempts=20, base_delay=5.0, max_delay=3600.0, max_age=None),
        CANCEL_BATCH: RetryPolicy(),
        LINE: PERIODIC,
        HOUSEKEEPING: PERIODIC,
    }
