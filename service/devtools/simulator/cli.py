"""Command line of the simulator: ``genrelay simulator --port N [--knob value ...]``.

Serves until SIGTERM or SIGINT, then stops cleanly and exits 0. One flag exists per knob of
`SimulatorSettings` (``--failure-rate 0.1``, ``--send-failure-callbacks`` ...), generated from
the knob table so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from service.devtools.simulator.server import SimulatorServer
from service.devtools.simulator.settings import KNOB_KINDS, SimulatorSettings

logger = logging.getLogger("genrelay.simulator")

_TYPES: dict[str, type] = {"float": float, "int": int, "str": str}


def _knob_help(name: str) -> str:
    default = next(f.default for f in dataclasses.fields(SimulatorSettings) if f.name == name)
    return f"default: {default}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: --host, --port, --api-key and one flag per knob."""
    parser = argparse.ArgumentParser(
        prog="genrelay simulator", description="Local simulator of the Deep-Image.ai REST API."
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0 = any)")
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        metavar="KEY",
        help="accepted x-api-key value; repeatable (default: sim-key)",
    )
    parser.add_argument("--log-level", default="INFO", help="default: INFO")
    knobs = parser.add_argument_group("simulator knobs")
    for name, kind in KNOB_KINDS.items():
        if kind == "keys":
            continue
        flag = "--" + name.replace("_", "-")
        if kind == "bool":
            knobs.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_knob_help(name),
            )
        else:
            knobs.add_argument(
                flag,
                dest=name,
                type=_TYPES[kind.rstrip("?")],
                default=None,
                help=_knob_help(name),
            )
    return parser


def settings_from_args(args: argparse.Namespace) -> SimulatorSettings:
    """Settings from parsed arguments; knobs not given keep their defaults."""
    changes: dict[str, Any] = {
        name: getattr(args, name)
        for name in KNOB_KINDS
        if name != "api_keys" and getattr(args, name) is not None
    }
    if args.api_keys:
        changes["api_keys"] = frozenset(args.api_keys)
    return SimulatorSettings(**changes)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the simulator until SIGTERM/SIGINT; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    # A no-op when the caller (genrelay's own CLI) already configured logging.
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("simulator received signal %s, stopping", signal.Signals(signum).name)
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request_stop)
    server = SimulatorServer(settings, host=args.host, port=args.port)
    try:
        server.start()
        # Short waits keep the main thread responsive to signals on every platform.
        while not stop.wait(0.5):
            pass
    except OSError as exc:
        logger.error("simulator could not start: %s", exc)
        return 1
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
