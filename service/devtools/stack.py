"""`genrelay dev`: the whole stack on a laptop with embedded defaults (what `make run` starts).

SQLite and fake-gcs-server's files under `var/`, the Deep-Image simulator on a free local
port, `genrelay serve` and `genrelay worker` as child processes; a fresh dev API key and a
ready-to-paste curl printed at start. Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from service.auth import ApiKeys
from service.database import Store
from service.devtools.ports import free_port
from service.migrate import upgrade_to_head
from service.notifications.events import tenant_webhook_secret
from service.tenants import Tenants

DEV_DEEPIMAGE_KEY = "sim-key"
DEV_BUCKET = "genrelay-dev"
DEV_HOST = "127.0.0.1"  # where the stack's web process listens
# The dev tenant may name gs://genrelay-dev-inputs/... as input images.
DEV_INPUT_BUCKET = "genrelay-dev-inputs"
TEXT_ONLY_EXAMPLE = {
    "width": 2048,
    "height": 1024,
    "background": {
        "generate": {
            "description": "woman in a futuristic suit holding a gun in her hand, looking at the "
            "camera, cyberpunk art, neo-figurative, anime"
        }
    },
}


class PortInUse(Exception):
    """The dev stack's web port is taken by another process."""


def check_port_free(port: int) -> None:
    """PortInUse if a process listens on `port`, as `genrelay serve` would bind it.

    Checked before anything starts: otherwise the stack's wait for /healthz would be answered
    by whatever holds the port (an earlier `make run`, another server), and the banner would
    announce a stack that is not up, with a key that this other server may not know.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As gunicorn binds: a port only in TIME_WAIT is free to it.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((DEV_HOST, port))  # where the stack's `genrelay serve` listens
        except OSError as exc:
            raise PortInUse(
                f"port {port} is in use by another process ({exc.strerror}); stop it, or "
                "choose another port with --port N (or PORT=N)"
            ) from None


def exited(processes: dict[str, subprocess.Popen[bytes]]) -> str | None:
    """Which of the named dev processes has exited, and how; None while all run."""
    for name, process in processes.items():
        if (status := process.poll()) is not None:
            return f"`genrelay {name}` exited with status {status}"
    return None


def _wait_until_up(url: str, processes: dict[str, subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (gone := exited(processes)) is not None:
            raise RuntimeError(f"{gone} during start-up (see its log above)")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def run_dev_stack(*, port: int, var_dir: str) -> int:
    """Start everything, print how to use it, and wait for Ctrl-C."""
    try:
        check_port_free(port)
    except PortInUse as exc:
        print(f"genrelay dev: {exc}", file=sys.stderr)
        return 1
    var = Path(var_dir).resolve()
    var.mkdir(parents=True, exist_ok=True)
    database_url = f"sqlite:///{var / 'genrelay-dev.db'}"
    upgrade_to_head(database_url)
    store = Store(database_url)
    keys = ApiKeys(store)
    api_key = keys.create("dev")
    tenant = keys.tenant_for(api_key)
    assert tenant is not None
    with store.transaction() as session:
        inbox_secret = tenant_webhook_secret(session, tenant.id)
    Tenants(store).set("dev", add_input_buckets=[DEV_INPUT_BUCKET])
    store.dispose()
    signer = dev_signer_file(os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"), var)

    from service.devtools.gcs_emulator import FakeGcsServer

    # Objects survive restarts with the filesystem backend, like the SQLite file beside them.
    gcs = FakeGcsServer(backend="filesystem", root=var / "gcs", log_path=var / "gcs.log").start()
    gcs.create_bucket(DEV_BUCKET)
    gcs.create_bucket(DEV_INPUT_BUCKET)
    simulator_port = free_port()
    inbox_port = free_port()
    env = {
        **os.environ,
        "GENRELAY_DATABASE_URL": database_url,
        "GENRELAY_DEEPIMAGE_URL": f"http://127.0.0.1:{simulator_port}",
        "GENRELAY_DEEPIMAGE_API_KEY": DEV_DEEPIMAGE_KEY,
        "GENRELAY_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "GENRELAY_CALLBACK_SECRET": secrets.token_urlsafe(32),
        "GENRELAY_ALLOW_PRIVATE_WEBHOOKS": "1",
        "GENRELAY_GCS_BUCKET": DEV_BUCKET,
        "STORAGE_EMULATOR_HOST": gcs.url,
        # A service-account key signs result.url and gs:// inputs for the emulator.
        "GOOGLE_APPLICATION_CREDENTIALS": signer,
        "GENRELAY_WEB_PROCESSES": "1",
        "PORT": str(port),
    }
    # Our own interpreter and module, with arguments we build: no untrusted input. `-P`: the
    # current directory is not put first on the import path, so a `service` package there
    # (another project's, an older checkout) is not what the children run.
    command = [sys.executable, "-P", "-m", "service.cli"]
    processes = {
        "simulator": subprocess.Popen(  # noqa: S603
            [
                *command,
                "simulator",
                "--port",
                str(simulator_port),
                "--api-key",
                DEV_DEEPIMAGE_KEY,
                "--fetch-inputs",  # downloads gs:// inputs through their signed URLs
            ],
            env=env,
        ),
        "inbox": subprocess.Popen(  # noqa: S603
            [*command, "inbox", "--port", str(inbox_port), "--secret", inbox_secret], env=env
        ),
        # On loopback only: the dev stack allows webhooks to private addresses and prints
        # its key, and other machines of the network have no business with it.
        "serve": subprocess.Popen([*command, "serve", "--host", DEV_HOST], env=env),  # noqa: S603
        "worker": subprocess.Popen(  # noqa: S603
            [*command, "worker", "--threads", "2"], env=env
        ),
    }
    stopping = False

    def _stop(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        simulator = {"simulator": processes["simulator"]}
        _wait_until_up(f"http://127.0.0.1:{simulator_port}/_sim/health", simulator, 15)
        _wait_until_up(f"http://127.0.0.1:{port}/healthz", processes, 30)
        print(_banner(port, api_key, gcs.url, inbox_port), flush=True)
        while not stopping:
            # (Ctrl-C reaches the children too: one may exit before `stopping` is seen.)
            if (gone := exited(processes)) is not None and not stopping:
                raise RuntimeError(f"{gone} (see its log above); stopping the others")
            time.sleep(0.2)
    except RuntimeError as exc:
        print(f"genrelay dev: {exc}", file=sys.stderr)
        stopping = False
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        gcs.stop()
    return 0 if stopping else 1


def dev_signer_file(given: str | None, var: Path) -> str:
    """The key file that signs URLs for the stack's emulator: GOOGLE_APPLICATION_CREDENTIALS
    (`given`) where it is a service-account key, else the throwaway one in var/.

    A developer's GOOGLE_APPLICATION_CREDENTIALS is often their gcloud login (a user's
    credentials, which cannot sign), or a file since moved; the stack needs no real account,
    so it says so and signs with its own key rather than stopping.
    """
    if given and given.strip():
        from google.auth import exceptions as auth_exceptions
        from google.oauth2 import service_account

        try:
            service_account.Credentials.from_service_account_file(given.strip())
            return given.strip()
        except (OSError, ValueError, auth_exceptions.GoogleAuthError) as exc:
            fallback = dev_signing_key(var)
            print(
                "genrelay dev: GOOGLE_APPLICATION_CREDENTIALS is not a service-account key "
                f"file ({type(exc).__name__}); signing with the stack's throwaway key {fallback}",
                file=sys.stderr,
            )
            return str(fallback)
    return str(dev_signing_key(var))


def dev_signing_key(var: Path) -> Path:
    """A throwaway service-account key file in var/ (made once): it signs URLs for the local
    emulator, which does not check signatures. It is no key of any real account."""
    path = var / "dev-signer.json"
    if path.exists():
        return path
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "genrelay-local",
        "private_key_id": "dev",
        "private_key": pem,
        "client_email": "dev-signer@genrelay-local.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    path.write_text(json.dumps(info))
    path.chmod(0o600)
    return path


def _banner(port: int, api_key: str, gcs_url: str, inbox_port: int) -> str:
    inbox = f"http://127.0.0.1:{inbox_port}/"
    body = json.dumps({"input": TEXT_ONLY_EXAMPLE, "webhook": inbox})
    base = f"http://127.0.0.1:{port}"
    return f"""
genrelay dev stack is up: API {base} (docs {base}/docs),
with SQLite, the Deep-Image simulator and a local GCS emulator (files under var/).
Dev API key: {api_key}

Try the seed's text-only example:

  curl -s -X POST {base}/v1/generations \\
    -H 'Authorization: Bearer {api_key}' \\
    -H 'Content-Type: application/json' \\
    -d '{body}'

then GET {base}/v1/generations/<id> with the same Authorization header: within a few
seconds its status is "succeeded" and result.uri is gs://{DEV_BUCKET}/<object>; result.url (and
the notification's) is a signed link to the local GCS emulator, and so is the redirect of

  curl -s -L -o result.png -H 'Authorization: Bearer {api_key}' \\
    {base}/v1/generations/<id>/result

Input images may be gs://{DEV_INPUT_BUCKET}/<object> (upload with
curl -X POST --data-binary @in.png \\
  '{gcs_url}/upload/storage/v1/b/{DEV_INPUT_BUCKET}/o?uploadType=media&name=in.png').

The local inbox at {inbox} verifies each notification's signature and prints it here
(generation.processing, then generation.succeeded).

Press Ctrl-C to stop.
"""
