"""Draw the figures of docs/performance.md from the benchmarks' JSON reports.

    python bench/plots.py var/bench docs/img

Reads `<dir>/<name>.json` as written by `make bench` (each benchmark's `--json-out`) and
writes one PNG per benchmark it finds; a missing report is skipped with a note.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

GENRELAY = "#2b6cb0"
BASELINE = "#a0aec0"
SECOND_BASELINE = "#4a5568"
THIRD_BASELINE = "#90cdf4"
FOURTH_BASELINE = "#c6f6d5"


def _bars(
    ax: Any,
    labels: list[str],
    groups: list[tuple[float, ...]],
    names: tuple[str, ...],
    unit: str,
) -> None:
    """Grouped bars: genrelay next to its baseline(s) for each label."""
    xs = range(len(labels))
    width = 0.76 / len(names)
    colors = (GENRELAY, BASELINE, SECOND_BASELINE, THIRD_BASELINE, FOURTH_BASELINE)
    for i, name in enumerate(names):
        offset = (i - (len(names) - 1) / 2) * width
        ax.bar([x + offset for x in xs], [g[i] for g in groups], width, label=name, color=colors[i])
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel(unit)
    ax.set_ylim(top=ax.get_ylim()[1] * (1 + 0.1 * len(names)))  # room for the legend
    ax.legend(frameon=False, loc="upper left", fontsize="small")
    ax.spines[["top", "right"]].set_visible(False)


def _save(fig: Any, out: Path, name: str) -> None:
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)


def _bar_chart(
    out: Path, name: str, title: str, *bars: Any, figsize: tuple[float, float] = (6, 3.6)
) -> None:
    """One figure, ``_bars(ax, *bars)`` titled ``title``, saved as ``out/name``."""
    fig, ax = plt.subplots(figsize=figsize)
    _bars(ax, *bars)
    ax.set_title(title)
    _save(fig, out, name)


def intake(reports: dict[str, Any], out: Path) -> None:
    """Intake: req/s and latency percentiles, genrelay next to the minimal forwarder (and the
    durable forwarder and the two floors, in reports that have them: the floors run on
    PostgreSQL only, so SQLite's group has no bars for them)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    shown = {"genrelay": "genrelay", "forwarder": "minimal forwarder"}
    if all("durable forwarder" in report["targets"] for report in reports.values()):
        shown["durable forwarder"] = "durable forwarder"
    for floor in ("statement floor", "function floor"):
        if any(floor in report["targets"] for report in reports.values()):
            shown[floor] = floor
    labels, throughput, p50, p99 = [], [], [], []
    for name, report in reports.items():
        targets = [report["targets"].get(target, {}) for target in shown]
        labels.append(name)
        throughput.append(tuple(t.get("req_per_s", math.nan) for t in targets))
        p50.append(tuple(t.get("p50_ms", math.nan) for t in targets))
        p99.append(tuple(t.get("p99_ms", math.nan) for t in targets))
    names = tuple(shown.values())
    _bars(left, labels, throughput, names, "requests/s")
    left.set_title("POST /v1/generations throughput")
    _bars(
        right,
        [f"{label}\np50" for label in labels] + [f"{label}\np99" for label in labels],
        p50 + p99,
        names,
        "ms",
    )
    right.set_title("latency")
    _save(fig, out, "intake.png")


def completion(report: dict[str, Any], out: Path) -> None:
    """Callback -> succeeded per result size, next to the bare streamed copy."""
    labels = [size["label"] for size in report["sizes"]]
    pairs = [
        (size["phases"]["server"]["median"], size["raw"]["stream"]["median"])
        for size in report["sizes"]
    ]
    names = ("callback → succeeded", "bare download → upload")
    _bar_chart(out, "completion.png", "completion path, median", labels, pairs, names, "seconds")


def deliveries(reports: dict[str, Any], out: Path) -> None:
    """Deliveries/s of one worker next to a bare requests pool."""
    labels = list(reports)
    pairs = [
        (r["targets"]["genrelay"]["deliveries_per_s"], r["targets"]["bare"]["deliveries_per_s"])
        for r in reports.values()
    ]
    names = ("genrelay worker", "bare requests pool")
    _bar_chart(
        out, "deliveries.png", "signed webhook deliveries", labels, pairs, names, "deliveries/s"
    )


def scale(reports: dict[str, dict[str, Any]], out: Path) -> None:
    """Generations/s with 1 and 2 worker processes, whole path and backlog drain: every process
    sharing the cores ("scale"), and each worker capped to a CPU quota of its own ("capped")."""
    labels, pairs = [], []
    for key, setting in (("scale", "shared cores"), ("capped", "{cores} core per worker")):
        report = reports.get(key)
        if report is None:
            continue
        cases = report["cases"]
        quota = cases[0].get("worker_quota") if cases else None
        setting = setting.format(cores=quota["cores_each"] if quota else "?")
        for case in ("whole", "backlog"):
            per = report["summary"][case]["per_workers"]
            labels.append(f"{'whole path' if case == 'whole' else 'backlog'}\n{setting}")
            pairs.append((per["1"]["gen_per_s"], per["2"]["gen_per_s"]))
    title = "scale-out on PostgreSQL (2 cores)"
    names = ("1 worker", "2 workers")
    _bar_chart(out, "scale.png", title, labels, pairs, names, "generations/s", figsize=(7, 3.6))


def large_table(report: dict[str, Any], out: Path) -> None:
    """Latency on an empty database next to one with 1 M generations and 100 k tasks."""
    summary = report["summary"]
    labels, pairs = [], []
    for operation in ("intake", "list", "read"):
        targets = summary[operation]["per_target"]
        for quantile in ("p50_ms", "p99_ms"):
            labels.append(f"{operation}\n{quantile[:3]}")
            pairs.append((targets["large"][quantile], targets["empty"][quantile]))
    title, names = "latency with large tables (PostgreSQL)", ("1 M generations", "empty")
    _bar_chart(out, "large-table.png", title, labels, pairs, names, "ms", figsize=(7, 3.6))


def _load(directory: Path, name: str) -> dict[str, Any] | None:
    path = directory / f"{name}.json"
    if not path.exists():
        print(f"skipped {name}: no {path}")
        return None
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    source, out = Path(argv[0]), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    plots: list[tuple[list[str], Callable[..., None], bool]] = [
        (["intake-sqlite", "intake-postgresql"], intake, True),
        (["completion"], completion, False),
        (["deliveries-sqlite", "deliveries-postgresql"], deliveries, True),
        (["scale", "scale-capped"], scale, True),
        (["large-table"], large_table, False),
    ]
    for names, draw, by_database in plots:
        loaded = {n.rsplit("-", 1)[-1]: r for n in names if (r := _load(source, n))}
        if not loaded:
            continue
        draw(loaded if by_database else next(iter(loaded.values())), out)
        print(f"drew {draw.__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
