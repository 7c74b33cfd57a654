"""gunicorn settings when gunicorn is run by hand from a checkout; `genrelay serve` uses the
same module from the installed package."""

from service.server.gunicorn_conf import *  # noqa: F403
