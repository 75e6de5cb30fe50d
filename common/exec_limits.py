"""What an exec request (ExecSync, Exec) may carry, and how long calls may wait.

crigw refuses an oversized request before it reaches shimd, and shimd
before it reaches the container's shim: the shim is the container's only
supervisor, so nothing a client sends may make it read or decode without
bound. The limits follow the kernel's: execve(2) refuses a single argument
of MAX_ARG_STRLEN (32 pages) or more, and argv plus the environment past
ARG_MAX (a quarter of the 8 MiB default stack: 2 MiB); half of that is left
for the runtime's own arguments and the process's environment.
"""

from __future__ import annotations

from typing import Any

from common.errors import InvalidArgument

MAX_EXEC_ARG_BYTES = 32 * 4096 - 1  # MAX_ARG_STRLEN, less the terminating NUL
MAX_EXEC_ARGV_BYTES = 1024 * 1024  # every argument with its NUL
MAX_EXEC_ARGS = 16 * 1024

# The longest ExecSync timeout honoured as given: a longer one is clamped to
# it. Timeout 0 (no timeout, per the CRI) already ends the call after this long.
MAX_EXEC_TIMEOUT_SECONDS = 24 * 3600
# The longest StopContainer grace period honoured as given (a week): a
# longer one is clamped, the container is SIGKILLed after it. Refusing it
# instead would leave a pod whose terminationGracePeriodSeconds is huge
# impossible to stop, since the kubelet retries with the same value.
MAX_STOP_TIMEOUT_SECONDS = 7 * 24 * 3600


def check_exec_command(command: list[Any], what: str = "exec") -> list[str]:
    """The command as strings; InvalidArgument when execve could not take it
    or it exceeds the limits above (the message names the limit)."""
    if not command:
        raise InvalidArgument(f"{what} command must not be empty")
    if len(command) > MAX_EXEC_ARGS:
        raise InvalidArgument(f"{what} command has {len(command)} arguments, over the limit of {MAX_EXEC_ARGS}")
    total = 0
    checked = []
    for index, part in enumerate(command):
        if not isinstance(part, str):
            raise InvalidArgument(f"{what} command argument {index} is not a string")
        size = len(part.encode("utf-8", "surrogatepass"))
        if size > MAX_EXEC_ARG_BYTES:
            raise InvalidArgument(
                f"{what} command argument {index} is {size} bytes, over the kernel's limit of {MAX_EXEC_ARG_BYTES} "
                f"per argument (MAX_ARG_STRLEN)"
            )
        if "\0" in part:
            raise InvalidArgument(f"{what} command argument {index} contains a NUL byte, which execve cannot pass")
        total += size + 1
        checked.append(part)
    if total > MAX_EXEC_ARGV_BYTES:
        raise InvalidArgument(f"{what} command arguments are {total} bytes in all, over the limit of {MAX_EXEC_ARGV_BYTES}")
    return checked


def clamp_timeout(seconds: float, maximum: float, what: str) -> float:
    """A non-negative timeout in seconds, at most `maximum`."""
    if seconds != seconds or seconds < 0:  # NaN or negative
        raise InvalidArgument(f"{what} must not be negative")
    return min(float(seconds), float(maximum))
