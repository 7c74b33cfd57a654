"""The dev stack's throwaway signing key: a service-account key file google-auth can load,
made once in var/, private to its owner, whose URLs point at the local emulator."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.oauth2 import service_account

from service.adapters.blobstore import GcsBlobStore
from service.devtools.stack import dev_signer_file, dev_signing_key


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


def test_the_dev_stack_signs_with_a_service_account_key_it_is_given(tmp_path: Path) -> None:
    (tmp_path / "own").mkdir()
    own = dev_signing_key(tmp_path / "own")
    assert dev_signer_file(str(own), tmp_path / "var") == str(own)
    assert not (tmp_path / "var" / "dev-signer.json").exists()


def test_the_dev_stack_signs_with_its_throwaway_key_where_it_is_given_one_that_cannot_sign(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A developer's GOOGLE_APPLICATION_CREDENTIALS is often their gcloud login (a user's,
    which cannot sign): the stack's processes died in a traceback."""
    user = tmp_path / "adc.json"
    user.write_text('{"type": "authorized_user", "client_id": "c", "refresh_token": "r"}')
    var = tmp_path / "var"
    var.mkdir()
    for given in (str(user), str(tmp_path / "missing.json")):
        assert dev_signer_file(given, var) == str(var / "dev-signer.json")
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("genrelay dev: GOOGLE_APPLICATION_CREDENTIALS is not a ")
        assert line.endswith(f"signing with the stack's throwaway key {var / 'dev-signer.json'}")
    assert dev_signer_file(None, var) == str(var / "dev-signer.json")
    assert capsys.readouterr().err == ""
