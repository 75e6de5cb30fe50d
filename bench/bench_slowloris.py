"""Slowloris against crigw's streaming server (issue 15 item 8).

1,500 connections to the streaming port, each sending one byte of a never
finished request head per second, reopened as soon as the server closes
them, for ATTACK_SECONDS. Measured: crigw's threads, open fds and RSS before,
at their peak during, and after the attack (from /proc), how many slow
connections the server closed, and the round trip of real execs run during
the attack. On a private stack with a private test registry.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from cri_api.v1 import api_pb2

from bench.bench_containers import start_sleeping_pod
from bench.timing import p95
from tests.fixtures_images import start_registry
from tests.harness import Stack
from tests.oci_images import push_busybox
from tests.slowloris import ProcessUsage, Slowloris, process_usage
from tests.streaming_client import spdy_exec

ATTACKERS = 1500
ATTACK_SECONDS = 30.0
EXEC_INTERVAL_SECONDS = 2.0


def _exec_url(runtime, container_id: str, cmd: list[str]) -> str:
    request = api_pb2.ExecRequest(container_id=container_id, cmd=cmd, stdout=True, stderr=True)
    return runtime.Exec(request, timeout=20).url


def _figures(prefix: str, usage: ProcessUsage) -> dict[str, float | str]:
    return {
        f"crigw_threads_{prefix}": usage.threads,
        f"crigw_fds_{prefix}": usage.fds,
        f"crigw_rss_mib_{prefix}": round(usage.rss_kib / 1024, 1),
    }


def run() -> dict[str, float | str]:
    workdir = Path(tempfile.mkdtemp(prefix="pyrio-bench-registry-"))
    registry = start_registry(workdir, workdir / "storage", "bench")
    stack = Stack()
    try:
        image = push_busybox(registry, "bench/busybox", "latest").reference
        stack.start()
        runtime = stack.runtime
        runtime_images = stack.images
        runtime_images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
        _, container_id = start_sleeping_pod(runtime, image, str(stack.root / "pod-logs"))
        crigw = stack.service_pid("crigw")
        assert spdy_exec(_exec_url(runtime, container_id, ["true"])).exit_code == 0  # warm up
        before = process_usage(crigw)
        port = urlsplit(_exec_url(runtime, container_id, ["true"])).port or 0

        attack = Slowloris("127.0.0.1", port, ATTACKERS, reconnect=True).start()
        peak = {"threads": before.threads, "fds": before.fds, "rss_kib": before.rss_kib}
        exec_ms: list[float] = []
        exec_failures = 0
        started = time.monotonic()
        next_exec = started
        try:
            while time.monotonic() - started < ATTACK_SECONDS:
                usage = process_usage(crigw)
                for key in peak:
                    peak[key] = max(peak[key], getattr(usage, key))
                if time.monotonic() >= next_exec:
                    next_exec += EXEC_INTERVAL_SECONDS
                    begun = time.perf_counter()
                    try:
                        ok = spdy_exec(_exec_url(runtime, container_id, ["echo", "ok"])).stdout == b"ok\n"
                    except Exception:  # noqa: BLE001 - a failed exec is a figure here
                        ok = False
                    if ok:
                        exec_ms.append((time.perf_counter() - begun) * 1000)
                    else:
                        exec_failures += 1
                time.sleep(0.25)
            attack_open_at_end = attack.open_count
        finally:
            attack.stop()
        time.sleep(2)
        after = process_usage(crigw)
        figures: dict[str, float | str] = {"attack": f"{ATTACKERS} connections at 1 byte/s, reopened when closed, {ATTACK_SECONDS:.0f}s"}
        figures.update(_figures("before", before))
        figures.update(_figures("peak_during_attack", ProcessUsage(peak["threads"], peak["fds"], peak["rss_kib"])))
        figures.update(_figures("after", after))
        figures["slow_connections_opened"] = attack.opened
        figures["slow_connections_closed_by_server"] = attack.closed_by_server
        figures["slow_connections_open_at_end"] = attack_open_at_end
        figures["real_execs_ok_during_attack"] = len(exec_ms)
        figures["real_execs_failed_during_attack"] = exec_failures
        if exec_ms:
            figures["real_exec_roundtrip_ms_p50_during_attack"] = round(statistics.median(exec_ms), 1)
            figures["real_exec_roundtrip_ms_p95_during_attack"] = round(p95(exec_ms), 1)
        return figures
    finally:
        stack.stop()
        registry.stop()
        shutil.rmtree(workdir, ignore_errors=True)
