"""`make bench`: run every bench/bench_*.py module's `run()` and print its figures.

Each module's `run() -> dict[str, float | str]` starts what it needs (usually a
tests.harness.Stack), measures, cleans up, and returns named figures.
`python -m bench pull sandbox` runs only the named ones.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path


def main(selected: list[str]) -> int:
    names = sorted(
        module.name[len("bench_") :]
        for module in pkgutil.iter_modules([str(Path(__file__).parent)])
        if module.name.startswith("bench_")
    )
    failures = 0
    for name in names:
        if selected and name not in selected:
            continue
        started = time.monotonic()
        print(f"== bench {name}", flush=True)
        try:
            figures = importlib.import_module(f"bench.bench_{name}").run()
        except Exception:
            traceback.print_exc()
            failures += 1
            continue
        for key, value in figures.items():
            print(f"  {key:<48} {value}")
        print(f"  ({time.monotonic() - started:.1f}s)", flush=True)
        results_dir = Path(__file__).parent / "results"
        results_dir.mkdir(exist_ok=True)
        (results_dir / f"{name}.json").write_text(json.dumps(figures, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
