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
# Base image: python:3.11-slim on Debian bookworm, minor version pinned, and
# NOT pinned to a digest. Why: a digest must be resolved against the registry
# (`docker buildx imagetools inspect python:3.11-slim-bookworm`), and the machine this file
# was written on has neither a Docker engine nor registry access; a digest copied from
# anywhere else could not be checked and would fail the build if wrong. To pin it, resolve
# the digest where the registry is reachable and write both FROM lines as
# python:3.11-slim-bookworm@sha256:<digest> (tests/unit/test_packaging.py accepts either
# form, and checks both stages use the same base).
#
# Python packages are pinned fully: requirements.lock holds every dependency of the service
# (and the build backend) at one version with its sha256 hashes, and pip installs it with
# --require-hashes, so the image gets exactly the files that were locked.

# ---------------------------------------------------------------------------------------
# Builder: a virtualenv with the locked dependencies, and genrelay installed into it.
# ---------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS builder

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Dependency layer first, from the lock file alone: requirements.lock pins every dependency
# of install_requires (and theirs, and the build backend: setuptools, wheel) to one version
# and its sha256 hashes. It is made from setup.cfg by pip-tools (`make lock`); pip refuses any
# file whose hash is not listed. This layer is reused until requirements.lock changes;
# editing the code does not reinstall anything. (The extras `dev` and `local` are not in the
# lock: no test or dev tools go into the image.)
COPY requirements.lock ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes -r requirements.lock \
    && /opt/venv/bin/pip check

# Then the code: exactly what the package is built from (README.md is the long
# description), installed into the same venv without dependencies (all are in the lock) and
# without build isolation (the locked setuptools builds it; nothing unhashed is fetched).
# tests/, bench/, docs/, the dev tools (service/devtools/, left out by .dockerignore) and the
# rest of the checkout never enter the build.
COPY setup.cfg pyproject.toml README.md ./
COPY service/ service/
COPY handlers/ handlers/
COPY schemas/ schemas/
COPY migrations/ migrations/
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
    && /opt/venv/bin/pip check

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

# The venv, dependencies and genrelay installed; everything stays owned by root, read-only
# to the service user. The command checks, from outside any checkout, that the command is
# installed, the modules import, the migration scripts are in the package and the dev tools
# are not.
COPY --from=builder /opt/venv /opt/venv
RUN cd / \
    && genrelay --help > /dev/null \
    && python -c "import service.app, service.bootstrap, service.runtime.worker, service.migrate, service.cli; from importlib.resources import files; from importlib.util import find_spec; assert (files('migrations') / 'env.py').is_file() and (files('migrations') / 'script.py.mako').is_file(); assert find_spec('service.devtools') is None, 'service.devtools is in the image'"

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
