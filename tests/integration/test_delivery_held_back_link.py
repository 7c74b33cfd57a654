"""A delivery held back behind an earlier event to the same target (lifecycle order) starts
its own retry schedule only when that one ends: every attempt of it still falls within the
time the `result.url` in its body is signed for."""

from __future__ import annotations

import datetime as dt
from typing import Any

from service.config import Config
from service.notifications.deliver import ORDER_WAIT
from tests.helpers import drain
from tests.integration.test_notifications import generate, subscribe

SCHEDULE = (0.0, 2.0, 2.0)
# What the worker adds to a held-back delivery: it looks again ORDER_WAIT after it found the
# earlier one still pending, then takes a moment to claim and send (the link's extra hour
# covers this in production).
SLACK = ORDER_WAIT + 1.0


def test_every_attempt_of_a_held_back_delivery_falls_within_its_links_lifetime(
    config: Config, make_client: Any, receiver_factory: Any
) -> None:
    cfg = config.replace(webhook_retry_schedule=SCHEDULE)
    services, client, auth = make_client(cfg)
    receiver = receiver_factory([500])  # the endpoint is down
    subscribe(client, auth, receiver.url)  # generation.processing and generation.succeeded
    generate(client, auth)
    drain(services, seconds=60)
    # The seconds the link is signed for beyond its extra hour (at least
    # GENRELAY_SIGNED_URL_TTL otherwise, which this schedule would not show).
    window = cfg.replace(signed_url_ttl=0).notification_url_ttl - 3600
    spans = {}
    for delivery in client.get("/v1/deliveries", headers=auth).json["data"]:
        detail = client.get(f"/v1/deliveries/{delivery['id']}", headers=auth).json
        assert (detail["status"], detail["attempt_count"]) == ("dead", len(SCHEDULE))
        created = dt.datetime.fromisoformat(detail["created_at"])
        last = dt.datetime.fromisoformat(detail["attempts"][-1]["attempted_at"])
        spans[detail["event_type"]] = (last - created).total_seconds()
    # The succeeded event waited for the processing one to die first.
    assert spans["generation.succeeded"] > sum(SCHEDULE) * 0.8 * 2 - SLACK
    assert spans["generation.succeeded"] <= window + SLACK, (spans, window)
