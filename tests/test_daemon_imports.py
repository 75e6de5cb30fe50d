"""What each daemon loads at start: modules that cost megabytes and that a
daemon does not use stay out of it (issue 14, idle memory).

Each check runs the daemon's entry module in a fresh interpreter, so what
another test imported cannot hide a regression.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.daemon import parse_args

REPO = Path(__file__).resolve().parents[1]

# module -> why no daemon needs it at start
NOT_AT_START = {
    "argparse": "one --config option is parsed by hand",
    "jeepney": "only the systemd cgroup driver talks D-Bus, and only when it does",
    "psutil": "crigw needs it only to kill a failed or orphaned exec",
    "prometheus_client": "crigw writes its /metrics itself (services/crigw/prometheus_text.py)",
    "http.server": "crigw's /metrics listener reuses the streaming server's request-head reader",
    "urllib.request": "nothing at start fetches a URL (prometheus_client loaded it)",
}
# Not in the daemons behind crigw: grpc loads asyncio in crigw anyway, and
# crigw's streaming tokens are made with secrets.
NOT_BEHIND_THE_GATEWAY = {
    "asyncio": "zmq.utils.monitor pulled it in (with ssl); monitor frames are parsed by hand",
    "secrets": "ids come from os.urandom",
}


def modules_after_import(service: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module('services.{service}.__main__')\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(result.stdout))


@pytest.mark.parametrize("service", ["crigw", "imaged", "netd", "shimd"])
def test_daemon_does_not_load_what_it_does_not_use(service: str) -> None:
    loaded = modules_after_import(service)
    unwanted = dict(NOT_AT_START)
    if service != "crigw":
        unwanted.update(NOT_BEHIND_THE_GATEWAY)
    found = {module: why for module, why in unwanted.items() if module in loaded}
    assert not found, f"{service} imports at start: {found}"


def test_config_option_forms() -> None:
    assert parse_args("imaged", []) is None
    assert parse_args("imaged", ["--config", "/etc/x.toml"]) == "/etc/x.toml"
    assert parse_args("imaged", ["--config=/etc/y.toml"]) == "/etc/y.toml"


@pytest.mark.parametrize("argv", [["--bogus"], ["--config"], ["extra"]])
def test_bad_arguments_exit_2_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args("netd", argv)
    assert exited.value.code == 2
    assert "usage: pyrio-netd [--config PATH]" in capsys.readouterr().err


def test_help_exits_0() -> None:
    result = subprocess.run([sys.executable, "-m", "services.netd", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--config PATH" in result.stdout
