"""Local simulator of the Deep-Image.ai REST API, for dev mode, tests and benchmarks.

    settings = SimulatorSettings(api_keys=frozenset({"sim-key"}), failure_rate=0.1)
    app = create_simulator_app(settings)            # Flask app (test client use)
    with SimulatorServer(settings) as sim:          # real loopback port
        requests.get(f"{sim.url}/rest_api/me", headers={"x-api-key": "sim-key"}, timeout=5)

See docs/simulator.md for the behaviour decided where the vendor docs are silent.
"""

from service.devtools.simulator.app import create_simulator_app, get_engine
from service.devtools.simulator.jobs import SimulatorEngine
from service.devtools.simulator.server import SimulatorServer
from service.devtools.simulator.settings import SimulatorSettings

__all__ = [
    "SimulatorEngine",
    "SimulatorServer",
    "SimulatorSettings",
    "create_simulator_app",
    "get_engine",
]
