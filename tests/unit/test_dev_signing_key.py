"""The dev stack's throwaway signing key: a service-account key file google-auth can load,
made once in var/, private to its owner, whose URLs point at the local emulator."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.oauth2 import service_account

from service.adapters.blobstore import GcsBlobStore
from service.devtools.stack import dev_signing_key


def test_the_key_is_made_once_and_signs_urls_for_the_emulator(tmp_path: Path) -> None:
    path = dev_signing_key(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert dev_signing_key(tmp_path) == path
    assert path.read_bytes() == first  # reused, not remade

    credentials = service_account.Credentials.from_service_account_file(str(path))
    client = storage.Client(
        project="genrelay-local",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": "http://127.0.0.1:4443"},
    )
    store = GcsBlobStore("genrelay-dev", client=client, signing_credentials=credentials)
    url = store.signed_url("ten_1/2026/12/05/gen_1.png", dt.timedelta(minutes=5))
    client.close()
    assert url is not None
    assert url.startswith("http://127.0.0.1:4443/genrelay-dev/ten_1/2026/12/05/gen_1.png?")
    assert "X-Goog-Signature=" in url
