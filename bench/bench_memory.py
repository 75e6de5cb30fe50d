"""`bench memory`: the daemons' PSS idle, after 200 pods come and go, and where it goes.

Issue 14's target 2: supervisord plus the daemons (and shimd's shim zygote)
idle after start, and again after PYRIO_BENCH_CHURN_PODS (200) pods, each
with one sleeping container, were started and removed 20 at a time (a
relist and a stats call after each batch, as the kubelet would make).

The profile part says what the idle figure is made of, per daemon, each
measured in a fresh interpreter so nothing else is loaded: a bare
interpreter, then the daemon's entry module imported (PSS and anonymous
PSS, modules loaded), then the anonymous memory the heaviest imports add
on top of what the daemons share (zmq, msgpack, logging, common.rpc).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cri_api.v1 import api_pb2

from bench.compare_runtimes import Pyrio
from bench.compare_workload import Pods
from bench.proc_stats import pss_kib, rollup_kib
from bench.stacks import local_registry

CHURN_PODS = int(os.environ.get("PYRIO_BENCH_CHURN_PODS", "200"))
BATCH = 20
SETTLE_SECONDS = 5  # past a quiet daemon's heap trim (common/heap.py)
REPO = Path(__file__).resolve().parents[1]

# What the daemons share, then the heaviest single imports measured on top of it.
SHARED_BASE = "import zmq, msgpack, logging, json, threading, socket, dataclasses, common.rpc, common.config"
HEAVY_IMPORTS = {
    "crigw": ["grpc", "cri_api.v1.api_pb2", "cri_api.v1.api_pb2_grpc"],
    "imaged": ["http.client", "ssl", "tarfile", "zstandard"],
    "netd": ["subprocess", "ctypes"],
    "shimd": ["subprocess", "ctypes"],
}

_MEASURE = """
import importlib, json, sys
def rollup(field):
    for line in open('/proc/self/smaps_rollup'):
        if line.startswith(field + ':'):
            return int(line.split()[1])
before = rollup('Pss_Anon')
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps({"pss": rollup('Pss'), "anon": rollup('Pss_Anon'), "added_anon": rollup('Pss_Anon') - before,
                  "modules": len(sys.modules)}))
"""


def _fresh_interpreter(prelude: str, modules: list[str]) -> dict[str, int]:
    result = subprocess.run([sys.executable, "-c", prelude + "\n" + _MEASURE, *modules], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


def import_profile() -> dict[str, Any]:
    figures: dict[str, Any] = {}
    bare = _fresh_interpreter("", [])
    figures["profile: bare interpreter PSS / anon KiB"] = f"{bare['pss']} / {bare['anon']} ({bare['modules']} modules)"
    supervisor = _fresh_interpreter("", ["supervisor.supervisord"])
    figures["profile: supervisord imports PSS / anon KiB"] = (
        f"{supervisor['pss']} / {supervisor['anon']} ({supervisor['modules']} modules)")
    for service, heavy in HEAVY_IMPORTS.items():
        loaded = _fresh_interpreter("", [f"services.{service}.__main__"])
        figures[f"profile: {service} imports PSS / anon KiB"] = (
            f"{loaded['pss']} / {loaded['anon']} ({loaded['modules']} modules)")
        for module in heavy:
            added = _fresh_interpreter(SHARED_BASE, [module])["added_anon"]
            figures[f"profile:   {service}: + {module} anon KiB"] = added
    return figures


def _snapshot(rt: Pyrio, label: str, figures: dict[str, Any]) -> float:
    per_process = {name: pss_kib(pid) / 1024 for name, pid in rt.service_pids().items()}
    total = sum(per_process.values())
    figures[f"{label}: daemons PSS MiB"] = round(total, 1)
    for name, pid in rt.service_pids().items():
        threads = len(os.listdir(f"/proc/{pid}/task"))
        figures[f"  {label}: {name} PSS / anon MiB, threads"] = (
            f"{per_process[name]:.1f} / {rollup_kib(pid, 'Pss_Anon') / 1024:.1f}, {threads}")
    return total


def churn(figures: dict[str, Any]) -> None:
    with local_registry() as (registry, image):
        rt = Pyrio()
        try:
            rt.start()
            time.sleep(SETTLE_SECONDS)
            idle = _snapshot(rt, "idle", figures)
            rt.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=image)), timeout=120)
            pods = Pods(rt, image)
            for _ in range(CHURN_PODS // BATCH):
                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(lambda _: pods.start(), range(BATCH)))
                rt.runtime.ListContainers(api_pb2.ListContainersRequest(), timeout=30)
                rt.runtime.ListPodSandboxStats(api_pb2.ListPodSandboxStatsRequest(), timeout=60)
                pods.remove_all()
            time.sleep(SETTLE_SECONDS)
            after = _snapshot(rt, f"after {CHURN_PODS} pods", figures)
            figures[f"growth after {CHURN_PODS} pods % (target 10)"] = round((after / idle - 1) * 100, 1)
            figures["idle target MiB"] = 64
        finally:
            rt.stop()


def run() -> dict[str, Any]:
    figures: dict[str, Any] = {}
    churn(figures)
    figures.update(import_profile())
    return figures
