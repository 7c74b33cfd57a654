"""Process hosting: gunicorn's configuration, logging and worker class; the background HTTP
server of the simulator and the inbox."""
