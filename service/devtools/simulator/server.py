"""Run the simulator on a real TCP port in a background thread (service/background_server)."""

from __future__ import annotations

import logging

from service.devtools.simulator.app import create_simulator_app, get_engine
from service.devtools.simulator.settings import SimulatorSettings
from service.server.background_server import STOP_TIMEOUT, BackgroundServer

logger = logging.getLogger("genrelay.simulator")


class SimulatorServer(BackgroundServer):
    """The simulator served on ``host:port`` (0 = any free port) from a background thread."""

    label = "simulator"

    def __init__(
        self,
        settings: SimulatorSettings | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.settings = settings or SimulatorSettings()
        super().__init__(create_simulator_app(self.settings), host, port, logger=logger)

    def start(self) -> SimulatorServer:
        """Bind, then serve in a background thread; returns once the socket is listening."""
        super().start()
        logger.info("Deep-Image simulator listening on %s", self.url)
        return self

    def before_shutdown(self) -> None:
        # The engine first: it wakes handlers that wait (latency, process_result) so their
        # threads can end, stops the scheduler and waits for webhook deliveries in flight.
        get_engine(self.app).shutdown(STOP_TIMEOUT)

    def stop(self) -> None:
        """Stop serving, close connections and stop job/callback threads; idempotent."""
        already = self._stopped
        super().stop()
        if not already:
            logger.info("Deep-Image simulator stopped")
