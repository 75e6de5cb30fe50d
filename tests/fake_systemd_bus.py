"""A real dbus-daemon on a private socket with a stand-in for systemd's Manager object on it.

For hosts without systemd: the D-Bus client of the systemd cgroup driver
(common/cgroups/systemd_dbus.py) then still talks the real wire protocol
through a real bus daemon (names, match rules, signals, errors). The stand-in
answers StartTransientUnit, StopUnit and SetUnitProperties the way systemd
does: a job path, then a JobRemoved signal for it; NoSuchUnit for a unit it
does not know; a started slice gets its directory in a fake cgroup tree. What systemd itself does with a unit is tested on the node
lane's systemd guest.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jeepney import DBusAddress, MessageType, new_error, new_method_return, new_signal
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

from common.cgroups.systemd import expand_slice

MANAGER = DBusAddress("/org/freedesktop/systemd1", bus_name="org.freedesktop.systemd1",
                      interface="org.freedesktop.systemd1.Manager")


@dataclass
class FakeSystemd:
    address: str
    calls: list[tuple[str, tuple]] = field(default_factory=list)
    units: dict[str, list] = field(default_factory=dict)
    # Unit name -> systemd's result word for its job ("done", "failed", ...).
    results: dict[str, str] = field(default_factory=dict)
    # Where a started slice gets its cgroup directory, as systemd makes it (None: nowhere).
    cgroup_root: Path | None = None

BUS_START_SECONDS = 30.0


def available() -> bool:
    return shutil.which("dbus-daemon") is not None


class FakeSystemdBus:
    """`with FakeSystemdBus(tmp) as fake:` sets nothing globally; point DBUS_SYSTEM_BUS_ADDRESS at fake.address."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "system_bus_socket"
        self.daemon: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()
        self.state = FakeSystemd(address=f"unix:path={self.socket}")

    def __enter__(self) -> FakeSystemd:
        self.daemon = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address={self.state.address}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        # A busy machine may take seconds to start dbus-daemon.
        if not ready.wait(BUS_START_SECONDS + 10):
            self.__exit__()
            raise RuntimeError("the fake systemd did not get onto the bus")
        return self.state

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(5)
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon.wait(5)

    def _serve(self, ready: threading.Event) -> None:
        deadline = time.monotonic() + BUS_START_SECONDS
        while not self.socket.exists() and time.monotonic() < deadline:
            self.stopping.wait(0.05)
        connection = open_dbus_connection(bus=self.state.address)
        connection.send_and_get_reply(message_bus.RequestName(MANAGER.bus_name), timeout=5)
        ready.set()
        jobs = 0
        with connection:
            while not self.stopping.is_set():
                try:
                    message = connection.receive(timeout=0.1)
                except TimeoutError:
                    continue
                header = message.header
                if header.message_type != MessageType.method_call:
                    continue
                method = header.fields.get(3)  # HeaderFields.member
                self.state.calls.append((method, message.body))
                unit = message.body[0] if message.body else ""
                if method == "StartTransientUnit":
                    if unit in self.state.units:
                        connection.send(new_error(message, "org.freedesktop.systemd1.UnitExists", "s",
                                                  (f"Unit {unit} was already loaded or has a fragment file.",)))
                        continue
                    self.state.units[unit] = list(message.body[2])
                elif method == "StartUnit":
                    self.state.units.setdefault(unit, [])
                    if self.state.cgroup_root is not None and unit.endswith(".slice"):
                        (self.state.cgroup_root / expand_slice(unit).lstrip("/")).mkdir(parents=True, exist_ok=True)
                elif method in ("StopUnit", "SetUnitProperties"):
                    if unit not in self.state.units:
                        connection.send(new_error(message, "org.freedesktop.systemd1.NoSuchUnit", "s",
                                                  (f"Unit {unit} not loaded.",)))
                        continue
                    if method == "StopUnit":
                        del self.state.units[unit]
                    else:
                        self.state.units[unit].extend(message.body[2])
                        connection.send(new_method_return(message))
                        continue
                else:
                    connection.send(new_error(message, "org.freedesktop.DBus.Error.UnknownMethod", "s", (method,)))
                    continue
                jobs += 1
                job = f"/org/freedesktop/systemd1/job/{jobs}"
                connection.send(new_method_return(message, "o", (job,)))
                connection.send(new_signal(MANAGER, "JobRemoved", "uoss",
                                           (jobs, job, unit, self.state.results.get(unit, "done"))))
