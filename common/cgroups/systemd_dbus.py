"""systemd's D-Bus API (org.freedesktop.systemd1.Manager) over the system bus.

jeepney speaks the D-Bus wire protocol in pure Python (no libdbus, no C
build), which is all pyrio needs: a few method calls and one signal. A
connection is opened per operation: units are started and stopped once per
container, and a per-call connection needs no lock and survives a restarted
dbus-daemon.
"""

from __future__ import annotations

import os
from typing import Any

from common.errors import FailedPrecondition, Internal

# jeepney is imported by the calls themselves: only a node on the systemd
# cgroup driver needs it, and it costs every daemon that imports this module
# about 300 KiB.
SYSTEMD_OBJECT_PATH = "/org/freedesktop/systemd1"
SYSTEMD_BUS_NAME = "org.freedesktop.systemd1"
SYSTEMD_INTERFACE = "org.freedesktop.systemd1.Manager"
JOB_TIMEOUT_SECONDS = 30.0
SYSTEM_BUS_SOCKET = "/run/dbus/system_bus_socket"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"

Property = tuple[str, tuple[str, Any]]


def systemd_booted() -> bool:
    """sd_booted(3): systemd is PID 1 when /run/systemd/system exists."""
    return os.path.isdir("/run/systemd/system")


def _call(method: str, signature: str, body: tuple, wait_job: bool = False) -> Any:
    from jeepney import DBusAddress, MatchRule, new_method_call
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    systemd = DBusAddress(SYSTEMD_OBJECT_PATH, bus_name=SYSTEMD_BUS_NAME, interface=SYSTEMD_INTERFACE)
    try:
        connection = open_dbus_connection(bus="SYSTEM")
    except (OSError, ValueError, RuntimeError) as exc:
        raise FailedPrecondition(
            f"cannot reach systemd over D-Bus (system bus {SYSTEM_BUS_SOCKET}): {exc}; "
            "the systemd cgroup driver needs systemd as PID 1 and a running dbus"
        ) from None
    try:
        if not wait_job:
            return _unwrap(connection.send_and_get_reply(new_method_call(systemd, method, signature, body),
                                                         timeout=JOB_TIMEOUT_SECONDS), method, body)
        # Listen for JobRemoved before asking, so the signal cannot be missed.
        bus_rule = MatchRule(type="signal", sender=systemd.bus_name, interface=systemd.interface,
                             member="JobRemoved", path=systemd.object_path)
        connection.send_and_get_reply(message_bus.AddMatch(bus_rule), timeout=JOB_TIMEOUT_SECONDS)
        # Locally the sender is systemd's unique name, not the well-known one: match without it.
        local_rule = MatchRule(type="signal", interface=systemd.interface, member="JobRemoved",
                               path=systemd.object_path)
        with connection.filter(local_rule, bufsize=64) as signals:
            job = _unwrap(connection.send_and_get_reply(new_method_call(systemd, method, signature, body),
                                                        timeout=JOB_TIMEOUT_SECONDS), method, body)[0]
            while True:
                try:
                    signal = connection.recv_until_filtered(signals, timeout=JOB_TIMEOUT_SECONDS)
                except TimeoutError:
                    raise Internal(f"systemd did not finish {method} of {body[0]} within {JOB_TIMEOUT_SECONDS:g}s") from None
                _job_id, job_path, unit, result = signal.body
                if job_path == job:
                    if result != "done":
                        raise FailedPrecondition(f"systemd {method} of {unit}: job {result}")
                    return job
    finally:
        connection.close()


def _unwrap(reply: Any, method: str, body: tuple) -> Any:
    from jeepney import DBusErrorResponse
    from jeepney.wrappers import unwrap_msg

    try:
        return unwrap_msg(reply)
    except DBusErrorResponse as exc:
        raise FailedPrecondition(f"systemd {method} of {body[0]}: {exc.name}: {' '.join(map(str, exc.data))}") from None


def start_transient_unit(name: str, properties: list[Property]) -> None:
    """StartTransientUnit(name, "fail", properties) and wait until its job is done."""
    _call("StartTransientUnit", "ssa(sv)a(sa(sv))", (name, "fail", properties, []), wait_job=True)


def start_unit(name: str) -> None:
    """StartUnit(name, "replace") and wait: a slice gets its cgroup (a no-op for an active unit)."""
    _call("StartUnit", "ss", (name, "replace"), wait_job=True)


def stop_unit(name: str) -> None:
    """StopUnit(name, "replace"); a unit systemd does not know is already stopped."""
    try:
        _call("StopUnit", "ss", (name, "replace"), wait_job=True)
    except FailedPrecondition as exc:
        if NO_SUCH_UNIT not in str(exc):
            raise


def set_unit_properties(name: str, properties: list[Property]) -> None:
    """SetUnitProperties(name, runtime=true, properties): until reboot, as the kubelet sets slices."""
    _call("SetUnitProperties", "sba(sv)", (name, True, properties))
