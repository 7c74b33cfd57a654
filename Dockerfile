# genrelay: one image for `genrelay serve` (the default), `genrelay worker` and
# `genrelay migrate`, chosen by the command:
#
#   docker run IMAGE            -> genrelay serve (gunicorn on 0.0.0.0:$PORT)
#   docker run IMAGE worker     -> genrelay worker
#   docker run IMAGE migrate    -> genrelay migrate
#
# The service runs from the installed package (site-packages of /opt/venv), never from a
# checkout: gunicorn settings and the Alembic scripts ship inside the wheel.
#
# Only Dockerfile syntax the classic builder understands is used (no heredocs, no
# RUN --mount), so the file builds the same with or without BuildKit; Cloud Build's
# gcr.io/cloud-builders/docker is not guaranteed to have buildx.
#
# Base image: python:3.11-slim on Debian bookworm, minor version pinned. Pin it further to a
# digest (python:3.11-slim-bookworm@sha256:...) once one is resolved with
# `docker buildx imagetools inspect python:3.11-slim-bookworm`; no digest is written here
# because it could not be looked up offline when this file was written.

# ---------------------------------------------------------------------------------------
# Builder: a virtualenv with the dependencies, and a wheel of genrelay itself.
# ---------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Dependency layer first, built from the packaging metadata alone: install_requires is read
# out of setup.cfg into requirements.txt and installed into /opt/venv. This layer is reused
# until setup.cfg or pyproject.toml change; editing the code does not reinstall anything.
# (The extras `dev` and `local` are not read: no test or dev tools go into the image.)
COPY setup.cfg pyproject.toml ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); print(c['options']['install_requires'])" > requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --prefer-binary -r requirements.txt

# Then the code: exactly what the wheel is built from (README.md is the long description).
# tests/, bench/, docs/ and the rest of the checkout never enter the build.
COPY README.md ./
COPY service/ service/
COPY handlers/ handlers/
COPY schemas/ schemas/
COPY migrations/ migrations/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------
# Runtime: no compiler, no sources, no tests; a non-root user.
# ---------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PORT=8080

# A fixed uid/gid so volume permissions and runAsNonRoot checks are predictable.
RUN groupadd --gid 10001 genrelay \
    && useradd --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin genrelay

# The dependencies (a layer that only changes with setup.cfg), then the genrelay wheel
# installed from it with no index: every dependency must already be in the venv, or the
# build fails here rather than at start-up. Everything stays owned by root, read-only to
# the service user. The last two commands check, from outside any checkout, that the
# command is installed, the modules import and the migration scripts are in the package.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /wheels/ /tmp/wheels/
RUN pip install --no-index --find-links=/tmp/wheels genrelay \
    && rm -rf /tmp/wheels \
    && cd / \
    && genrelay --help > /dev/null \
    && python -c "import service.app, service.bootstrap, service.worker, service.migrate; from importlib.resources import files; assert (files('migrations') / 'env.py').is_file() and (files('migrations') / 'script.py.mako').is_file()"

# A neutral working directory: nothing of the repository is here, the package runs from
# site-packages.
WORKDIR /app

USER 10001:10001

# Cloud Run sends requests to $PORT (8080 unless it says otherwise); gunicorn binds to it.
EXPOSE 8080

# No HEALTHCHECK: Cloud Run ignores it and probes the container itself (TCP on $PORT by
# default; /healthz and /readyz are there for HTTP probes). The worker has no port at all.
#
# Exec form: genrelay is PID 1 and receives SIGTERM directly (gunicorn stops gracefully;
# the worker finishes the tasks in hand, then exits).
ENTRYPOINT ["genrelay"]
CMD ["serve"]
