"""Seccomp through the socket: RuntimeDefault is the containers-common / moby
style allow-list, translated per container from its capabilities, and
applies only when asked for (CRI contract).

A probe (tests/data/seccomp_probe.c, built with gcc -static here) tries the
syscalls a container escape usually starts with; an unconfined container
shows they reach this kernel, a RuntimeDefault one that they do not.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2

from services.shimd import spec_seccomp
from tests.fixtures_containers import Containers

PROBE_SOURCE = Path(__file__).with_name("data") / "seccomp_probe.c"
# Pinned: a change to the default profile changes what every default
# container may do, so it must be deliberate (update this with the review).
DEFAULT_PROFILE_SHA256 = "be3a0f014678c987e60d57e951acd5970ac9fa1c0ccea52bad80d94bc6d07db7"
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_SETGID", "CAP_SETUID",
                "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_KILL"]
EPERM, ENOSYS = "E1", "E38"


def _allowed_unconditionally(profile: dict, name: str) -> bool:
    return any(name in rule["names"] and rule["action"] == "SCMP_ACT_ALLOW" and not rule.get("args")
               for rule in profile["syscalls"])


def test_runtime_default_profile_is_pinned_and_an_allow_list() -> None:
    raw_bytes = spec_seccomp.SECCOMP_DEFAULT_PROFILE.read_bytes()
    assert hashlib.sha256(raw_bytes).hexdigest() == DEFAULT_PROFILE_SHA256
    plain = spec_seccomp.profile_for(spec_seccomp.runtime_default(), DEFAULT_CAPS, machine="x86_64", kernel="6.1.0")
    assert plain["defaultAction"] == "SCMP_ACT_ERRNO" and plain["defaultErrnoRet"] == 38
    assert plain["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    for name in ("read", "write", "execve", "openat", "futex", "epoll_pwait", "wait4"):
        assert _allowed_unconditionally(plain, name), name
    for name in ("clone", "clone3", "unshare", "setns", "mount", "pivot_root", "keyctl", "bpf", "io_uring_setup",
                 "io_uring_enter", "socket", "socketcall", "kexec_load", "init_module", "reboot"):
        assert not _allowed_unconditionally(plain, name), name
    clone_rules = [rule for rule in plain["syscalls"] if rule["names"] == ["clone"]]
    assert clone_rules == [{"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                            "args": [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}]
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in plain["syscalls"]
    # Capability-conditional: CAP_SYS_ADMIN brings the namespace syscalls and drops the clone filter.
    admin = spec_seccomp.profile_for(spec_seccomp.runtime_default(), DEFAULT_CAPS + ["CAP_SYS_ADMIN"], machine="x86_64")
    assert _allowed_unconditionally(admin, "unshare") and _allowed_unconditionally(admin, "clone3")
    assert not any(rule["names"] == ["clone3"] and rule["action"] == "SCMP_ACT_ERRNO" for rule in admin["syscalls"])
    # Architecture-conditional: arch_prctl only on amd64/x32, the s390 clone rule only on s390x.
    assert _allowed_unconditionally(plain, "arch_prctl")
    s390 = spec_seccomp.profile_for(spec_seccomp.runtime_default(), DEFAULT_CAPS, machine="s390x")
    assert s390["architectures"] == ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"]
    assert [rule["args"][0]["index"] for rule in s390["syscalls"] if rule["names"] == ["clone"]] == [1]
    assert not _allowed_unconditionally(s390, "arch_prctl")


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the seccomp probe cannot be built")
    directory = tmp_path_factory.mktemp("seccomp-probe")
    built = subprocess.run([gcc, "-static", "-O1", "-o", str(directory / "probe"), str(PROBE_SOURCE)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"gcc -static failed (no static libc?): {built.stderr[-500:]}")
    return directory


def _linux(kind: int | None, add_caps: list[str] = (), legacy_path: str = "") -> api_pb2.LinuxContainerConfig:
    linux = api_pb2.LinuxContainerConfig()
    linux.security_context.namespace_options.pid = api_pb2.CONTAINER
    if kind is not None:
        linux.security_context.seccomp.profile_type = kind
    if legacy_path:
        linux.security_context.seccomp_profile_path = legacy_path
    linux.security_context.capabilities.add_capabilities.extend(add_caps)
    return linux


def _probe(containers: Containers, pod, name: str, linux: api_pb2.LinuxContainerConfig, probe_dir: Path) -> dict[str, str]:
    container_id = containers.run(
        pod, name, command=["/probe/probe"], linux=linux,
        mounts=[api_pb2.Mount(container_path="/probe", host_path=str(probe_dir), readonly=True)],
    )
    lines = containers.output(container_id).splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_runtime_default_refuses_escape_syscalls(containers: Containers, probe_dir: Path) -> None:
    pod = containers.pod()
    unconfined = _probe(containers, pod, "unconfined", _linux(api_pb2.SecurityProfile.Unconfined), probe_dir)
    # The probe works and this kernel allows all of these to a container without a filter...
    for name in ("clone_newuser", "clone3", "io_uring_setup", "netlink_netfilter", "netlink_netfilter_high_bits"):
        assert unconfined[name] == "ok", (name, unconfined)
    confined = _probe(containers, pod, "confined", _linux(api_pb2.SecurityProfile.RuntimeDefault), probe_dir)
    # ...and RuntimeDefault refuses them, while ordinary syscalls still work.
    assert confined == {
        "clone_newuser": ENOSYS,  # clone with a namespace flag matches no allow rule: the default action
        "clone_plain": "ok",
        "unshare_newuser": EPERM,
        "clone3": ENOSYS,  # so libc falls back to clone
        "io_uring_setup": ENOSYS,
        "netlink_netfilter": EPERM,
        "netlink_netfilter_high_bits": ENOSYS,
        "netlink_route": "ok",
        "inet_stream": "ok",
        "unix_dgram": "ok",
    }


def test_runtime_default_follows_the_container_capabilities(containers: Containers, probe_dir: Path) -> None:
    pod = containers.pod()
    admin = _probe(containers, pod, "admin", _linux(api_pb2.SecurityProfile.RuntimeDefault, ["SYS_ADMIN", "NET_ADMIN"]), probe_dir)
    assert admin["unshare_newuser"] == "ok" and admin["clone3"] == "ok" and admin["clone_newuser"] == "ok"
    assert admin["netlink_netfilter"] == "ok"
    assert admin["io_uring_setup"] == ENOSYS  # no capability makes io_uring part of the default


def test_busybox_workload_runs_under_runtime_default(containers: Containers) -> None:
    script = (
        "set -e; mkdir -p /tmp/www; echo hello-from-httpd > /tmp/www/index.html;"
        " httpd -p 127.0.0.1:8080 -h /tmp/www; sleep 0.3;"
        " wget -q -O - http://127.0.0.1:8080/index.html;"
        " ls / | grep -c -x bin; pidof httpd >/dev/null && echo 1; ip -o addr show lo | grep -c 127.0.0.1;"
        " echo abc | sha256sum | cut -c1-8; date +%Y >/dev/null; touch /tmp/f; rm /tmp/f;"
        " grep Seccomp: /proc/self/status"
    )
    container_id = containers.run(command=["sh", "-c", script], linux=_linux(api_pb2.SecurityProfile.RuntimeDefault))
    status = containers.wait_exited(container_id)
    output = containers.output(container_id)
    assert status.exit_code == 0, output
    assert output.splitlines() == ["hello-from-httpd", "1", "1", "1", "edeaaff3", "Seccomp:\t2"]


def test_seccomp_only_when_asked_for(containers: Containers) -> None:
    """CRI: seccomp unset and an empty seccomp_profile_path is unconfined;
    RuntimeDefault (or the legacy runtime/default) applies only when asked."""
    pod = containers.pod()
    script = ["sh", "-c", "grep Seccomp: /proc/self/status"]
    unset = containers.run(pod, "unset", command=script, linux=_linux(None))
    legacy_default = containers.run(pod, "legacy", command=script, linux=_linux(None, legacy_path="runtime/default"))
    asked = containers.run(pod, "asked", command=script, linux=_linux(api_pb2.SecurityProfile.RuntimeDefault))
    assert containers.output(unset) == "Seccomp:\t0"
    assert containers.output(legacy_default) == "Seccomp:\t2"
    assert containers.output(asked) == "Seccomp:\t2"


def test_malformed_localhost_profiles_are_invalid_argument(containers: Containers, tmp_path: Path) -> None:
    pod = containers.pod()
    for index, text in enumerate(['[]', '{"syscalls": "all"}', '{"syscalls": [{"action": "SCMP_ACT_ALLOW"}]}',
                                  '{"syscalls": [{"names": ["read"]}]}', '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [7]}',
                                  '{"defaultAction": "SCMP_ACT_ALOW"}', '{"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 9, "op": "SCMP_CMP_EQ"}]}]}',
                                  '{"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "op": "EQ"}]}]}']):
        profile = tmp_path / f"bad{index}.json"
        profile.write_text(text)
        linux = _linux(api_pb2.SecurityProfile.Localhost)
        linux.security_context.seccomp.localhost_ref = str(profile)
        with pytest.raises(grpc.RpcError) as caught:
            containers.create(pod, containers.config(f"bad{index}", linux=linux))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, caught.value.details())
        assert "is not a valid seccomp profile" in caught.value.details()
