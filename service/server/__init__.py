"""Process hosting: gunicorn's configuration, logging and worker class, the worker's HTTP
endpoint."""
