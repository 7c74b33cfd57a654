"""Every benchmark script of bench/ runs to the end once, at a tiny size.

Not a measurement: the figures of such small runs mean nothing. It catches a benchmark that
no longer runs (a changed constructor, a new rate limit, a renamed column) before `make
bench` does, half an hour in. Each script is run as `make bench` runs it, through its command
line, with `--json-out`; the test checks the exit status and that the report was written.
The scripts that need PostgreSQL are skipped when the test server does not answer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _postgres_admin_url

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]

# (script, arguments, needs PostgreSQL, timeout in seconds)
SMOKE = [
    ("intake.py", ["--requests", "30", "--rounds", "1", "--warmup", "5", "--concurrency", "4"],
     False, 60),
    # PostgreSQL: with the statement floor as well
    ("intake.py", ["--requests", "30", "--rounds", "1", "--warmup", "5", "--concurrency", "4",
                   "--database", "postgresql"], True, 90),
    ("intake_cost.py", ["--requests", "30", "--no-valgrind", "--database", "sqlite"], False, 60),
    ("completion.py", ["--sizes", "64KB", "--repeats", "1", "--warmup", "0", "--skip-rss"],
     False, 60),
    ("deliveries.py", ["--deliveries", "20", "--rounds", "1"], False, 60),
    ("scale.py", ["--generations", "10", "--workers", "1", "--repeats", "1", "--modes", "whole"],
     True, 90),
    # Each worker in a CPU quota, as `make bench` runs it: one run, then another with a group
    # of the same worker number (needs a writable cgroup; skipped where there is none)
    ("scale.py", ["--generations", "10", "--workers", "1,2", "--repeats", "1", "--modes", "whole",
                  "--worker-cpu", "0.5"], True, 150),
    ("large_table.py", ["--generations", "1000", "--tenants", "3", "--tasks", "100",
                        "--requests", "10", "--reads", "5", "--rounds", "1", "--warmup", "2"],
     True, 120),
    ("soak.py", ["--generations", "4", "--rate", "20"], False, 120),
    ("catalog.py", ["--smoke", "--cases", "a", "--arms", "genrelay", "--database", "sqlite"],
     False, 90),
]  # fmt: skip


@pytest.mark.parametrize(
    ("script", "arguments", "postgres", "timeout"),
    SMOKE,
    ids=[
        script.removesuffix(".py")
        + ("-postgresql" if "postgresql" in arguments else "")
        + ("-capped" if "--worker-cpu" in arguments else "")
        for script, arguments, *_ in SMOKE
    ],
)
def test_benchmark_runs_to_the_end(
    script: str, arguments: list[str], postgres: bool, timeout: float, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENRELAY_")}
    if postgres:
        admin_url, reason = _postgres_admin_url()
        if admin_url is None:
            pytest.skip(reason)
        env["GENRELAY_TEST_POSTGRES_URL"] = admin_url
    if "--worker-cpu" in arguments and (reason := _cpu_quotas_refused()):
        pytest.skip(f"--worker-cpu needs a cgroup CPU quota: {reason}")
    env["PYTHONPATH"] = str(REPO)
    report = tmp_path / "report.json"
    argv = [sys.executable, str(REPO / "bench" / script), *arguments]
    argv += ["--json-out", str(report), "--log-dir", str(tmp_path / "logs")]
    output = tmp_path / "output.txt"
    with output.open("wb") as sink:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGTERM: the script stops every process it started (they are in sessions of
            # their own, out of reach of a kill of the script alone) and drops its databases.
            process.terminate()
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            pytest.fail(f"{script} did not finish in {timeout} s:\n{_tail(output)}")
    assert process.returncode == 0, f"{script} exited {process.returncode}:\n{_tail(output)}"
    written = json.loads(report.read_text())
    assert written, f"{script} wrote an empty report"
    if script == "intake.py":  # every target, durable forwarder included, forwarded each request
        expected = {"genrelay", "forwarder", "durable forwarder"}
        if "postgresql" in arguments:
            # genrelay's statements on its database, and the same in one call per transaction
            expected |= {"statement floor", "function floor"}
        assert set(written["targets"]) == expected
        for target, figures in written["targets"].items():
            assert figures["requests"] == 30 and figures["errors"] == figures["queued"] == 0, target
    # each target timed (30 requests: getrusage splits user and system time by clock ticks,
    # so 5 requests of the forwarder could show 0 ms of user time); genrelay's statements listed
    if script == "intake_cost.py":
        assert set(written["targets"]) == {"genrelay", "forwarder", "durable forwarder"}
        assert all(figures["user_ms_per_request"] > 0 for figures in written["targets"].values())
        assert any(s.startswith("INSERT INTO generations") for s in written["genrelay_statements"])


def _cpu_quotas_refused() -> str | None:
    """Why this machine refuses CPU-limited cgroups (bench/_cpulimit.py), or None."""
    spec = importlib.util.spec_from_file_location("_cpulimit", REPO / "bench" / "_cpulimit.py")
    assert spec is not None and spec.loader is not None
    cpulimit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpulimit)
    return cpulimit.available()  # type: ignore[no-any-return]


def _tail(path: Path, size: int = 4000) -> str:
    return path.read_text(errors="replace")[-size:]
