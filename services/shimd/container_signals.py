"""Stop signals: CRI's Signal enum, names and numbers."""

from __future__ import annotations

import signal

from common.errors import InvalidArgument

# CRI's Signal enum, by number (cri_api.v1 Signal); 0 is RUNTIME_DEFAULT.
CRI_SIGNALS = [
    "", "SIGABRT", "SIGALRM", "SIGBUS", "SIGCHLD", "SIGCLD", "SIGCONT", "SIGFPE", "SIGHUP", "SIGILL", "SIGINT",
    "SIGIO", "SIGIOT", "SIGKILL", "SIGPIPE", "SIGPOLL", "SIGPROF", "SIGPWR", "SIGQUIT", "SIGSEGV", "SIGSTKFLT",
    "SIGSTOP", "SIGSYS", "SIGTERM", "SIGTRAP", "SIGTSTP", "SIGTTIN", "SIGTTOU", "SIGURG", "SIGUSR1", "SIGUSR2",
    "SIGVTALRM", "SIGWINCH", "SIGXCPU", "SIGXFSZ",
]


def signal_number(name: str | int | None) -> int:
    """A signal from a CRI enum number, a name (SIGTERM, TERM) or a number string."""
    if name in (None, "", 0):
        return int(signal.SIGTERM)
    if isinstance(name, int):
        if 0 < name < len(CRI_SIGNALS):
            return int(getattr(signal, CRI_SIGNALS[name].replace("SIGCLD", "SIGCHLD").replace("SIGPOLL", "SIGIO")))
        raise InvalidArgument(f"unknown stop signal {name}")
    text = str(name).strip().upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(getattr(signal, text))
    except AttributeError:
        raise InvalidArgument(f"unknown stop signal {name!r}") from None


def cri_signal(number: int) -> int:
    """The CRI Signal enum value of a signal number (0, RUNTIME_DEFAULT, if it has none)."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return 0
    return CRI_SIGNALS.index(name) if name in CRI_SIGNALS else 0
