"""Fuzzed and mutated CRI calls (issue 15: "the fuzz counts by gRPC code with
INTERNAL at 0").

On a private stack (runc, CNI, the test registry with busybox): CALLS seeded
requests from tests.cri_fuzz spread over every RuntimeService and
ImageService RPC, 4 at a time, each with a deadline, bounded by BUDGET_S.
Printed: the gRPC codes per method and in total, and every INTERNAL /
UNKNOWN answer with its method, request and the daemon log lines that name
its error. What the calls created is removed, then the stack.
"""

from __future__ import annotations

import os

from bench.stacks import busybox_stack
from tests.cri_fuzz_run import BAD_CODES, fuzz, log_lines, make_anchors, services_running, sweep

CALLS = int(os.environ.get("PYRIO_FUZZ_CALLS", "8000"))
SEED = int(os.environ.get("PYRIO_FUZZ_SEED", "15"))
BUDGET_S = float(os.environ.get("PYRIO_FUZZ_BUDGET_S", "240"))


def run() -> dict[str, float | str]:
    with busybox_stack() as (stack, image):
        pids_before = services_running(stack)
        anchors = make_anchors(stack, image, registry_host=image.split("/", 1)[0])
        report = fuzz(stack, anchors, CALLS, SEED, BUDGET_S)
        pids_after = services_running(stack)
        print(report.table(), flush=True)
        for method, code, details, request in report.bad:
            print(f"  {code} {method}: {details}\n    request: {request}")
            exception = details.rsplit(": ", 2)[-2] if details.count(": ") >= 2 else details[:60]
            for line in log_lines(stack, exception, limit=5):
                print(f"    log {line}")
        leftovers = report.cleanup_failures + sweep(stack, strict=False)
        for leftover in leftovers:
            print(f"  clean-up: {leftover}")
        totals = report.totals()
        figures: dict[str, float | str] = {
            "calls": report.calls, "seed": SEED, "wall_s": round(report.seconds, 1),
            "methods": len(report.by_method),
            "cleanup_failures": len(leftovers),
            "services_restarted": ",".join(s for s in pids_before if pids_before[s] != pids_after[s]) or "none",
        }
        figures.update({f"code_{code}": count for code, count in sorted(totals.items())})
        figures["internal_or_unknown"] = sum(totals.get(code, 0) for code in BAD_CODES)
        return figures
