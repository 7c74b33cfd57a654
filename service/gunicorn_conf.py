"""gunicorn settings for `genrelay serve`, shipped inside the package.

Threads, not processes, carry concurrency: requests mostly wait on the database and on
Deep-Image. Counts come from the environment so Cloud Run can size them per instance.
"""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8080')}"
worker_class = "gthread"
workers = int(os.environ.get("GENRELAY_WEB_PROCESSES", "2"))
threads = int(os.environ.get("GENRELAY_WEB_THREADS", "8"))
# Cloud Run enforces request timeouts itself; gunicorn's would kill healthy slow requests.
timeout = 0
graceful_timeout = 20
keepalive = 5
accesslog = "-"
logger_class = "service.gunicorn_logging.RedactingLogger"
errorlog = "-"
# gunicorn 27's control socket sits at one fixed path per user: several servers on one
# machine (tests, benchmarks) would fight over it, and nothing here uses it.
control_socket_disable = True
loglevel = os.environ.get("GENRELAY_LOG_LEVEL", "info").lower()
