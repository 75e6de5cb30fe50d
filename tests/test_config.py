"""Configuration: embedded defaults, override files, strict rejection, and
the daemons and `pyrio config` built on it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common import config as config_module
from common.config import ConfigError, load_config
from tests.harness import REPO, Stack


def test_defaults_without_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PYRIO_CONFIG", raising=False)
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    config = load_config()
    assert config.pyrio.state_dir == "/var/lib/pyrio"
    assert config.pyrio.socket == "/run/pyrio/pyrio.sock"
    assert config.runtime.runtimes["runc"].root == "/run/pyrio/runtimes/runc"
    assert config.image.store_dir == "/var/lib/pyrio/imaged"
    assert config.network.cni_plugin_dirs == ["/usr/lib/cni", "/opt/cni/bin"]
    assert config.rpc_endpoint("imaged") == "ipc:///run/pyrio/rpc/imaged.sock"


def test_override_file_moves_every_path(tmp_path: Path) -> None:
    path = tmp_path / "pyrio.toml"
    path.write_text(
        f'[pyrio]\nstate_dir = "{tmp_path}/state"\nrun_dir = "{tmp_path}/run"\nrpc_timeout = 5\n'
        '[runtime]\nrestrict_oom_score_adj = false\n'
        '[image.registries."127.0.0.1:5000"]\ninsecure = true\nmirrors = ["127.0.0.1:5001"]\n'
    )
    config = load_config(str(path))
    assert config.source == str(path)
    assert config.pyrio.socket == f"{tmp_path}/run/pyrio.sock"
    assert config.pyrio.rpc_timeout == 5.0
    assert config.runtime.restrict_oom_score_adj is False
    assert config.runtime.runtimes["crun"].root == f"{tmp_path}/run/runtimes/crun"
    assert config.image.registries["127.0.0.1:5000"].mirrors == ["127.0.0.1:5001"]
    assert config.image.store_dir == f"{tmp_path}/state/imaged"


def test_env_variable_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "env.toml"
    path.write_text('[pyrio]\nlog_level = "debug"\n')
    monkeypatch.setenv("PYRIO_CONFIG", str(path))
    assert load_config().pyrio.log_level == "debug"


@pytest.mark.parametrize(
    "text, names",
    [
        ("[pyrio]\nstate_dri = '/x'\n", "'pyrio.state_dri'"),
        ("[nope]\nx = 1\n", "'nope'"),
        ("[runtime.runtimes.runc]\npath = '/usr/sbin/runc'\nroot = 3\n", "runtime.runtimes.runc.root"),
        ("[pyrio]\nrpc_timeout = 'soon'\n", "pyrio.rpc_timeout"),
        ("[network]\ncni_plugin_dirs = '/usr/lib/cni'\n", "network.cni_plugin_dirs"),
        ("[runtime]\ndefault_runtime = 'kata'\n", "runtime.default_runtime"),
        ("[image]\nmax_concurrent_downloads = 0\n", "image.max_concurrent_downloads"),
        ("[pyrio\n", "not valid TOML"),
    ],
)
def test_bad_config_is_rejected_naming_key_and_file(tmp_path: Path, text: str, names: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(path) in str(caught.value)
    assert names in str(caught.value)


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "typo.toml"))


def test_daemon_refuses_to_start_on_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[image]\nmax_concurrent_download = 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "services.imaged", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "image.max_concurrent_download" in result.stderr and str(path) in result.stderr


def test_pyrio_config_prints_effective_toml(tmp_path: Path) -> None:
    path = tmp_path / "pyrio.toml"
    path.write_text(f'[pyrio]\nrun_dir = "{tmp_path}/run"\n')
    result = subprocess.run(
        [sys.executable, "-m", "pyrio", "--config", str(path), "config"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
    )
    printed = tomllib.loads(result.stdout)
    assert printed["pyrio"]["socket"] == f"{tmp_path}/run/pyrio.sock"
    assert printed["runtime"]["restrict_oom_score_adj"] is True
    # What it prints is itself a valid config file giving the same result.
    again = tmp_path / "again.toml"
    again.write_text(result.stdout)
    assert load_config(str(again)).to_toml() == result.stdout


def test_pyrio_status_reports_each_service(stack: Stack) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pyrio", "--config", str(stack.config_path), "status"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(lines) == {"crigw", "imaged", "netd", "shimd"}
    for service, line in lines.items():
        assert " up " in line, line
        assert "supervisor=RUNNING" in line
        pid = int(line.split("pid=")[1].split()[0])
        assert pid == stack.service_pid(service)
