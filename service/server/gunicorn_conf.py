"""gunicorn settings for `genrelay serve`, shipped inside the package.

Threads, not processes, carry concurrency: requests mostly wait on the database and on
Deep-Image. Counts come from the environment so Cloud Run can size them per instance.
"""

import os
import tempfile

from service.config import ProcessSettings

_process = ProcessSettings.from_env()

# prometheus-client's multiprocess mode: every worker process writes its metrics to files
# here and /metrics aggregates them. Set before the workers import the app; a fresh
# directory per start, so no stale files from an earlier run are counted.
_metrics_dir = None
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    _metrics_dir = tempfile.mkdtemp(prefix="genrelay-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

# Every interface, as a container needs; `genrelay serve --host` replaces the address.
bind = f"0.0.0.0:{_process.port}"
# gthread, reading each request before a thread takes it, so slow or stalled clients cannot
# hold the threads (service/server/gunicorn_worker.py; GENRELAY_REQUEST_TIMEOUT).
worker_class = "service.server.gunicorn_worker.BoundedThreadWorker"
workers = _process.web_processes
threads = _process.web_threads
# Cloud Run enforces request timeouts itself; gunicorn's would kill healthy slow requests.
timeout = 0
# Platforms kill a process 10 s after SIGTERM (Cloud Run, docker stop): the arbiter kills
# its workers after 9 s, and each worker drains its requests for 6 s of them, then hands
# back the inline stores it still runs within EXIT_WAIT (service/server/gunicorn_worker.py,
# init_process).
graceful_timeout = 9
keepalive = 5
# Both logs on the console, which RedactingLogger makes JSON lines on stderr for both.
accesslog = "-"
logger_class = "service.server.gunicorn_logging.RedactingLogger"
errorlog = "-"
# gunicorn 27's control socket sits at one fixed path per user: several servers on one
# machine (tests, benchmarks) would fight over it, and nothing here uses it.
control_socket_disable = True
loglevel = _process.log_level.lower()


def child_exit(_server: object, worker: object) -> None:
    """Drop a finished worker's live gauges from the multiprocess metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined]


def on_exit(_server: object) -> None:
    """Remove the metrics directory this server made."""
    if _metrics_dir is not None:
        import shutil

        shutil.rmtree(_metrics_dir, ignore_errors=True)
