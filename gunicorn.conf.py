"""gunicorn settings when gunicorn is run by hand from a checkout; `genrelay serve` uses the
same module from the installed package."""

from service.gunicorn_conf import *  # noqa: F403
