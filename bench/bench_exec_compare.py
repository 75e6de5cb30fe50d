"""`bench exec_compare`: ExecSync `true` on containerd and pyrio, interleaved.

The quick cut of `bench compare`'s ExecSync figure: both runtimes are started
the same way (bench_compare.both_runtimes), each runs one pod of one sleeping
busybox container with the same seccomp profile (PYRIO_BENCH_SECCOMP, as in
compare_workload), and the calls alternate between them (ABBA order), so
the machine's load at any moment weighs on both alike.

Environment: PYRIO_BENCH_EXEC_CALLS (200 per runtime), PYRIO_BENCH_SECCOMP.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from cri_api.v1 import api_pb2

from bench.bench_compare import both_runtimes
from bench.compare_workload import Pods
from bench.timing import p95, percentile, timed

CALLS = int(os.environ.get("PYRIO_BENCH_EXEC_CALLS", "200"))
WARM_UP_CALLS = 5


def run() -> dict[str, Any]:
    times: dict[str, list[float]] = {"containerd": [], "pyrio": []}
    with both_runtimes("exec-compare") as (_, image, runtimes):
        requests = []
        pods = []
        for rt in runtimes:
            pod = Pods(rt, image)
            pods.append(pod)
            _, container_id = pod.start()
            request = api_pb2.ExecSyncRequest(container_id=container_id, cmd=["true"], timeout=10)
            requests.append((rt, request))
        try:
            for _ in range(WARM_UP_CALLS):
                for rt, request in requests:
                    rt.runtime.ExecSync(request, timeout=60)
            for index in range(CALLS):
                order = requests if index % 2 == 0 else list(reversed(requests))
                for rt, request in order:
                    elapsed, reply = timed(lambda: rt.runtime.ExecSync(request, timeout=60))
                    assert reply.exit_code == 0, reply
                    times[rt.name].append(elapsed)
        finally:
            for pod in pods:
                pod.remove_all()
    figures: dict[str, Any] = {"calls per runtime": CALLS, "seccomp": os.environ.get("PYRIO_BENCH_SECCOMP", "runtime_default")}
    for label, measure in (("median", statistics.median), ("p95", p95), ("p10", lambda values: percentile(values, 0.1))):
        ctr, pyr = measure(times["containerd"]), measure(times["pyrio"])
        figures[f"ExecSync {label} ms"] = f"containerd {ctr:7.1f}   pyrio {pyr:7.1f}   ratio {pyr / ctr:.2f}x"
    return figures
