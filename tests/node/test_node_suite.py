"""The container, sandbox and fault modules of `make test`, inside the guest,
under the systemd cgroup driver (tests/harness.py reads PYRIO_TEST_CGROUP_MANAGER)."""

from __future__ import annotations

import pytest

from tests.node.conftest import VENV_PYTHON

MODULES = ("tests/test_containers.py", "tests/test_sandboxes.py", "tests/test_faults.py")


@pytest.mark.parametrize("module", MODULES)
def test_module_passes_in_the_guest_under_systemd(guest, guest_repo: str, module: str) -> None:
    result = guest.run([VENV_PYTHON, "-m", "pytest", module, "-q", "-p", "no:cacheprovider", "--timeout=1800"],
                       cwd=guest_repo, env={"PYRIO_TEST_CGROUP_MANAGER": "systemd"}, timeout=5400)
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"{module} in the guest: {summary}")
    assert result.exit_code == 0, f"{module} in the guest exited {result.exit_code}:\n{result.stdout[-6000:]}{result.stderr[-3000:]}"
