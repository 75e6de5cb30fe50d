"""Slowloris against crigw's streaming server (issue 15 item 8).

1,500 connections to the streaming port, each sending one byte of a never
finished request head per second: first once, as the issue's attack (how
long until the server closed them all), then reopened as soon as the server
closes them, for ATTACK_SECONDS, while real execs run. Measured: crigw's
threads, open fds and RSS before, at their peak during each attack and
after (from /proc), the slow connections the server closed, and the round
trip of the real execs. On a private stack with a private test registry.
"""

from __future__ import annotations

import statistics
import time
from urllib.parse import urlsplit

from cri_api.v1 import api_pb2

from bench.bench_containers import start_sleeping_pod
from bench.stacks import busybox_stack
from bench.timing import p95
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


class _Peak:
    """The highest threads, fds and RSS of a process seen while sampling it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.usage = process_usage(pid)

    def sample(self) -> None:
        now = process_usage(self.pid)
        self.usage = ProcessUsage(*(max(a, b) for a, b in zip(
            (self.usage.threads, self.usage.fds, self.usage.rss_kib), (now.threads, now.fds, now.rss_kib))))


def _one_shot(crigw: int, port: int) -> dict[str, float | str]:
    """The issue's attack: ATTACKERS connections at 1 byte/s, not reopened."""
    attack = Slowloris("127.0.0.1", port, ATTACKERS).start()
    peak = _Peak(crigw)
    started = time.monotonic()
    try:
        while attack.closed_by_server < attack.opened and time.monotonic() - started < 120:
            peak.sample()
            time.sleep(0.25)
        closed_after = time.monotonic() - started
        left_open = attack.open_count
    finally:
        attack.stop()
    figures = _figures("peak_one_shot_attack", peak.usage)
    figures["one_shot_all_closed_by_server_s"] = round(closed_after, 1)
    figures["one_shot_left_open"] = left_open
    return figures


def run() -> dict[str, float | str]:
    with busybox_stack() as (stack, image):
        runtime = stack.runtime
        _, container_id = start_sleeping_pod(runtime, image, str(stack.root / "pod-logs"))
        crigw = stack.service_pid("crigw")
        assert spdy_exec(_exec_url(runtime, container_id, ["true"])).exit_code == 0  # warm up
        before = process_usage(crigw)
        port = urlsplit(_exec_url(runtime, container_id, ["true"])).port or 0
        figures: dict[str, float | str] = {
            "attacks": f"{ATTACKERS} connections at 1 byte/s: once (one_shot), then reopened when closed for {ATTACK_SECONDS:.0f}s",
        }
        figures.update(_figures("before", before))
        figures.update(_one_shot(crigw, port))

        attack = Slowloris("127.0.0.1", port, ATTACKERS, reconnect=True).start()
        peak = _Peak(crigw)
        exec_ms: list[float] = []
        exec_failures = 0
        started = time.monotonic()
        next_exec = started
        try:
            while time.monotonic() - started < ATTACK_SECONDS:
                peak.sample()
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
        figures.update(_figures("peak_sustained_attack", peak.usage))
        figures.update(_figures("after", process_usage(crigw)))
        figures["sustained_slow_connections_opened"] = attack.opened
        figures["sustained_slow_connections_closed_by_server"] = attack.closed_by_server
        figures["sustained_slow_connections_open_at_end"] = attack_open_at_end
        figures["real_execs_ok_during_sustained_attack"] = len(exec_ms)
        figures["real_execs_failed_during_sustained_attack"] = exec_failures
        if exec_ms:
            figures["real_exec_roundtrip_ms_p50_during_sustained_attack"] = round(statistics.median(exec_ms), 1)
            figures["real_exec_roundtrip_ms_p95_during_sustained_attack"] = round(p95(exec_ms), 1)
        return figures
