"""Exec, log reopening, attach and resize RPCs: what reaches a running container's shim."""

from __future__ import annotations

import base64
import logging
from typing import Any

from common.exec_limits import MAX_EXEC_TIMEOUT_SECONDS, check_exec_command, clamp_timeout
from common.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from common.ids import new_id
from common.rpc import CallContext
from services.shimd.records import RUNNING
from services.shimd.shim_client import shim_request
from services.shimd.container_lifecycle import STOP_MARGIN_SECONDS

log = logging.getLogger("pyrio.shimd")

# Per stream: the kubelet's gRPC client takes at most 16 MiB per message,
# and both streams travel in one.
EXEC_OUTPUT_LIMIT = 6 * 1024 * 1024
SHIM_REQUEST_TIMEOUT = 10.0


class ContainerExec:
    """container.exec_sync/reopen_log/attach_info/exec_info/resize (part of ShimDaemon)."""

    # --- exec, logs, attach -------------------------------------------------------------

    def _running(self, params: dict[str, Any], action: str) -> dict[str, Any]:
        record = self._record(params)
        state, _ = self.store.state(record)
        if state != RUNNING:
            raise FailedPrecondition(
                f"cannot {action} container {record['id'][:12]}: it is {self._state_word(state)}, not running"
            )
        return record

    def exec_sync(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        # Checked before anything reaches the shim, which must never be
        # handed a request it cannot take (common/exec_limits.py).
        command = check_exec_command(list(params.get("cmd") or []))
        timeout = clamp_timeout(float(params.get("timeout") or 0), MAX_EXEC_TIMEOUT_SECONDS, "exec timeout")
        record = self._running(params, "exec in")
        pid_file = str(self.store.directory(record["id"]) / f"exec-{new_id()[:16]}.pid")
        request = {"op": "exec", "cmd": command, "timeout": timeout, "pid_file": pid_file, "max_output": EXEC_OUTPUT_LIMIT}
        wait = (timeout + STOP_MARGIN_SECONDS) if timeout > 0 else max(call.remaining(), 1.0)
        try:
            reply = shim_request(self.store.control_socket(record["id"]), request, wait)
        except Unavailable:
            # The container ended (and its shim with it) after the check above.
            state, _ = self.store.state(record)
            if state == RUNNING:
                raise
            raise FailedPrecondition(f"cannot exec in container {record['id'][:12]}: it exited") from None
        if reply.get("timed_out"):
            raise DeadlineExceeded(f"command {command!r} timed out after {timeout:g}s and was killed")
        return {
            "stdout": base64.b64decode(reply["stdout"]),
            "stderr": base64.b64decode(reply["stderr"]),
            "exit_code": int(reply["exit_code"]),
        }

    def reopen_log(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._running(params, "reopen the log of")
        shim_request(self.store.control_socket(record["id"]), {"op": "reopen_log"}, SHIM_REQUEST_TIMEOUT)
        return {}

    def attach_info(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._record(params)
        state, _ = self.store.state(record)
        return {
            "attach_socket": self.store.attach_socket(record["id"]),
            "tty": record["tty"],
            "stdin": record["stdin"],
            "stdin_once": record["stdin_once"],
            "running": state == RUNNING,
        }

    def exec_info(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._record(params)
        state, _ = self.store.state(record)
        return {
            "runtime_path": record["runtime_path"],
            "runtime_root": record["runtime_root"],
            "runtime_id": record["id"],
            "running": state == RUNNING,
        }

    def resize(self, params: dict[str, Any], call: CallContext) -> dict[str, Any]:
        record = self._running(params, "resize")
        if not record["tty"]:
            raise FailedPrecondition(f"container {record['id'][:12]} has no TTY to resize")
        request = {"op": "resize", "width": int(params.get("width", 0)), "height": int(params.get("height", 0))}
        shim_request(self.store.control_socket(record["id"]), request, SHIM_REQUEST_TIMEOUT)
        return {}
