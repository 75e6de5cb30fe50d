"""`bench compare`: the same CRI workload against Debian's containerd and pyrio.

Both runtimes run side by side on this machine, each on its own socket, root,
CNI dir, bridge and subnet (bench/compare_runtimes.py), pulling from one local
registry that holds busybox, a pause image built from busybox for containerd,
and one cold-pull image per round (5 layers, ~200 MB of incompressible data).
The rounds alternate which runtime goes first; each figure is the median over
the rounds, printed with its pyrio/containerd ratio (below 1: pyrio is ahead,
for times, memory and CPU; above 1 for throughputs).

Environment: PYRIO_BENCH_ROUNDS (3), PYRIO_BENCH_PODS (110), PYRIO_BENCH_SECCOMP
(runtime_default, unconfined, or localhost: the profile both runtimes give every
container; each runtime's RuntimeDefault is its own, and pyrio's is the larger
filter, which runc compiles on every create and exec; localhost gives both
pyrio's as one file).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from cri_api.v1 import api_pb2

from bench.compare_runtimes import Containerd, CriRuntime, Pyrio
from bench.compare_workload import run_round
from bench.proc_stats import pss_kib, total_pss_kib
from tests.fixtures_images import start_registry
from tests.oci_images import BUSYBOX_PATH, Dir, File, build_and_push, push_busybox, tar_layer

ROUNDS = int(os.environ.get("PYRIO_BENCH_ROUNDS", "3"))
PODS = int(os.environ.get("PYRIO_BENCH_PODS", "110"))
PULL_LAYERS = 5
PULL_LAYER_MB = 40
IDLE_SETTLE_SECONDS = 5


def push_pause(registry: Any) -> str:
    """containerd's sandbox image: a static busybox that sleeps forever."""
    with open(BUSYBOX_PATH, "rb") as handle:
        busybox = handle.read()
    layer = tar_layer([Dir("bin"), File("bin/sleep", busybox, 0o755)])
    return build_and_push(registry, "bench/pause", "v1", layers=[layer],
                          config={"Entrypoint": ["/bin/sleep", "infinity"]}).reference


def push_pull_image(registry: Any, round_index: int) -> tuple[str, int]:
    """A fresh 5-layer image per round, so every pull is cold: (reference, compressed bytes)."""
    layers = [tar_layer([File(f"data-{index}", os.urandom(PULL_LAYER_MB << 20))]) for index in range(PULL_LAYERS)]
    pushed = build_and_push(registry, "bench/cold", f"round{round_index}", layers=layers)
    return pushed.reference, sum(descriptor["size"] for descriptor in pushed.manifest["layers"])


def pull(rt: CriRuntime, reference: str) -> None:
    rt.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=reference)), timeout=300)


def idle_figures(rt: CriRuntime) -> dict[str, float]:
    figures = {"idle daemons PSS MiB": round(total_pss_kib(rt.daemon_pids()) / 1024, 1)}
    for name, pid in rt.service_pids().items():
        figures[f"  idle {name} PSS MiB"] = round(pss_kib(pid) / 1024, 1)
    return figures


def format_table(results: dict[str, list[dict[str, float]]]) -> list[tuple[str, str]]:
    rows = []
    keys: list[str] = []
    for rounds in results.values():
        for figures in rounds:
            keys.extend(key for key in figures if key not in keys)
    for key in keys:
        medians = {}
        for name, rounds in results.items():
            values = [figures[key] for figures in rounds if key in figures]
            medians[name] = statistics.median(values) if values else None
        ctr, pyr = medians.get("containerd"), medians.get("pyrio")
        ratio = f"{pyr / ctr:.2f}x" if ctr and pyr is not None else "-"
        rows.append((key, f"containerd {ctr if ctr is not None else '-':>9}   pyrio {pyr if pyr is not None else '-':>9}   ratio {ratio}"))
    return rows


@contextmanager
def both_runtimes(label: str, on_started: Callable[[CriRuntime], None] | None = None) -> Iterator[tuple[Any, str, list[CriRuntime]]]:
    """A local registry with busybox and the pause image, and containerd and
    pyrio started and holding both images: (registry, busybox reference,
    runtimes). on_started sees each runtime before its first pull. Everything
    is stopped and removed on leaving."""
    workdir = Path(tempfile.mkdtemp(prefix=f"pyrio-bench-{label}-", dir="/tmp"))
    registry = start_registry(workdir, workdir / "storage", label)
    runtimes: list[CriRuntime] = []
    try:
        image = push_busybox(registry, "bench/busybox", "latest").reference
        pause = push_pause(registry)
        runtimes = [Containerd(registry.host, pause), Pyrio()]
        for rt in runtimes:
            rt.start()
            if on_started is not None:
                on_started(rt)
            pull(rt, image)
            if isinstance(rt, Containerd):
                pull(rt, pause)
        yield registry, image, runtimes
    finally:
        for rt in runtimes:
            rt.stop()
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run() -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {"containerd": [], "pyrio": []}

    def record_idle(rt: CriRuntime) -> None:
        time.sleep(IDLE_SETTLE_SECONDS)
        results[rt.name].append(idle_figures(rt))

    with both_runtimes("compare", record_idle) as (registry, image, runtimes):
        for round_index in range(ROUNDS):
            reference = push_pull_image(registry, round_index)
            order = runtimes if round_index % 2 == 0 else list(reversed(runtimes))
            for rt in order:
                figures = run_round(rt, image, reference, PODS)
                results[rt.name].append(figures)
                print(f"  [round {round_index + 1} {rt.name} done]", flush=True)
        # The idle figures are in the first entry only; rounds hold the rest.
        for rt in runtimes:
            after = {"after all rounds: daemons PSS MiB": round(total_pss_kib(rt.daemon_pids()) / 1024, 1)}
            for name, pid in rt.service_pids().items():
                after[f"  after all rounds: {name} PSS MiB"] = round(pss_kib(pid) / 1024, 1)
            results[rt.name].append(after)
    figures: dict[str, Any] = {"rounds": ROUNDS, "pods at scale": PODS}
    for key, text in format_table(results):
        figures[key] = text
    return figures
