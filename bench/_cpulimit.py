"""A CPU quota for benchmark processes, with Linux cgroups (v1 `cpu` controller or v2).

Why: on a small machine every process of the stack (web, workers, simulator, fake-gcs-server,
PostgreSQL, the load generator) shares the same cores, so adding a worker process can only
take CPU from the others. In production each worker runs on its own instance with its own CPU
(a Cloud Run instance has 1 vCPU, say). Giving each worker process a fixed quota here (a
fraction of one core) models that: the workers' CPU becomes the bottleneck the benchmark
compares, while the rest of the stack keeps the remaining cores.

`CpuQuota(name, cores)` makes a cgroup that holds at most `cores` of CPU time (CFS bandwidth:
`cores * period` microseconds per 100 ms period), `add(pid)` moves a running process (all its
threads) into it, `stats()` reads how often it was throttled, and `close()` removes the group
once its processes have exited. Needs root, or a delegated cgroup; `available()` says why not.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

PERIOD_US = 100_000
V1_CPU = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
_SERIAL = itertools.count(1)  # groups of one process are named apart by it


class CpuQuotaError(RuntimeError):
    """The machine does not let this process create a CPU-limited cgroup."""


def _v2() -> bool:
    controllers = V2_ROOT / "cgroup.controllers"
    return controllers.exists() and "cpu" in controllers.read_text().split()


def available() -> str | None:
    """None if quotas can be set here, else the reason they cannot."""
    if _v2():
        parent = V2_ROOT
    elif (V1_CPU / "cpu.cfs_quota_us").exists():
        parent = V1_CPU
    else:
        return "no cgroup cpu controller (neither v2 with 'cpu' nor v1 at /sys/fs/cgroup/cpu)"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable (needs root or a delegated cgroup)"
    return None


class CpuQuota:
    """One cgroup limited to `cores` of CPU; processes join it with `add`."""

    def __init__(self, name: str, cores: float) -> None:
        if not 0.01 <= cores <= 64:
            raise ValueError(f"a CPU quota of {cores} cores makes no sense")
        reason = available()
        if reason:
            raise CpuQuotaError(reason)
        self.cores = cores
        self.v2 = _v2()
        base = V2_ROOT if self.v2 else V1_CPU
        # Unique in this process: a group of an earlier run may still be there (its removal
        # waits for its processes to exit).
        self.path = base / f"{name}-{os.getpid()}-{next(_SERIAL)}"
        self.path.mkdir()
        quota = int(cores * PERIOD_US)
        try:
            if self.v2:
                (self.path / "cpu.max").write_text(f"{quota} {PERIOD_US}\n")
            else:
                (self.path / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
                (self.path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        except OSError as exc:
            self.close()
            raise CpuQuotaError(f"cannot set the quota in {self.path}: {exc}") from None
        self._start = self.stats()

    def add(self, pid: int) -> None:
        """Move process `pid` and every thread of it into the group (children inherit it)."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def stats(self) -> dict[str, float]:
        """Periods, throttled periods and seconds throttled since the group was made."""
        values: dict[str, int] = {}
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                values[key] = int(value)
        if self.v2:
            throttled_s = values.get("throttled_usec", 0) / 1e6
        else:
            throttled_s = values.get("throttled_time", 0) / 1e9
        now = {
            "periods": float(values.get("nr_periods", 0)),
            "throttled_periods": float(values.get("nr_throttled", 0)),
            "throttled_s": throttled_s,
        }
        start = getattr(self, "_start", None)
        return {k: v - start[k] for k, v in now.items()} if start else now

    def close(self, timeout: float = 5.0) -> None:
        """Remove the group (its processes must have exited; waits up to `timeout`)."""
        deadline = time.monotonic() + timeout
        while self.path.exists():
            try:
                self.path.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    return  # left behind: empty once its processes exit, never reused
                time.sleep(0.05)
