"""SIGTERM is Ctrl-C: one way to stop, whichever signal a person or a scheduler sends.

A batch scheduler, `kill` and `timeout` send SIGTERM; a terminal sends SIGINT. Both must leave
the same true states behind (MLflow runs KILLED, status files `interrupted`, resumable folders),
so SIGTERM is routed through whatever handles SIGINT at that moment: Python's default raises
KeyboardInterrupt (every command's clean-up path), and inside `Tuner.fit` Ray Tune's own handler
saves the experiment state and stops the trials gracefully. Only the exit code tells them apart:
130 for SIGINT, 143 for SIGTERM (128 + the signal number, as shells report them).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

INTERRUPTED = 128 + signal.SIGINT  # 130
TERMINATED = 128 + signal.SIGTERM  # 143

_received: list[int] = []


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _on_sigterm:
        handler(signal.SIGINT, frame)  # Python's default raises KeyboardInterrupt; Tune's saves
    else:  # SIGINT ignored or left to the OS: still stop the way Ctrl-C does
        raise KeyboardInterrupt


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def install() -> None:
    """Route SIGTERM through the SIGINT handler and note which signal came (main thread only;
    a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def record(signum: int) -> None:
    """Note a signal another handler caught (Ray's, while it starts), for exit_code and name."""
    _received.append(signum)


def received() -> bool:
    """Whether SIGINT or SIGTERM arrived since install()."""
    return bool(_received)


@contextmanager
def deferred() -> Iterator[None]:
    """Clean-up that must finish (status files, MLflow run ends) once a stop was asked for:
    a second Ctrl-C or SIGTERM meanwhile is noted, not raised (SIGKILL still ends it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, lambda signum, frame: _received.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def exit_code() -> int:
    """The exit code of a command stopped by a signal: 143 after SIGTERM, else 130."""
    return TERMINATED if signal.SIGTERM in _received else INTERRUPTED


def name() -> str:
    return "SIGTERM" if signal.SIGTERM in _received else "SIGINT"
