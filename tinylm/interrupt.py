"""SIGTERM and SIGINT: a command ends with one line and exit code 128 + the signal number.

SIGTERM is what SLURM, Kubernetes and spot instances send before they kill; SIGINT is Ctrl-C. Outside a
training loop both raise (`Interrupted`, `KeyboardInterrupt`), so `finally` blocks stop worker processes and
locks let go. Inside one, `StopRequests` only notes the first signal: the loop finishes the step in progress,
saves a checkpoint and raises `Interrupted` saying where. A second signal ends the process at once: the save it
cuts short is a temporary folder that the next save removes, and the checkpoints before it are untouched.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1
"""prctl(2)'s option that signals a process when its parent dies (Linux)."""


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class Interrupted(BaseException):
    """A stop asked for by a signal. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    on the way up mistakes it for a failure to handle."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = signum
        super().__init__(message or f"interrupted by {signal_name(signum)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum, frame):
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    # Python lets only the main thread set signal handlers (a notebook's worker thread, a test runner's).
    return threading.current_thread() is threading.main_thread()


@contextmanager
def terminate_raises():
    """Inside, SIGTERM raises `Interrupted` the way SIGINT raises KeyboardInterrupt."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopRequests:
    """Inside, the first SIGINT or SIGTERM is noted in `signum` for the loop to act on at a safe point; a
    second one prints `last_words` and ends the process at once with 128 + its number."""

    def __init__(self, last_words: str):
        self.signum: int | None = None
        self.last_words = last_words
        self._previous: dict = {}

    def _note(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        os.write(2, f"error: {signal_name(signum)} again, stopped at once: {self.last_words}\n".encode())
        os._exit(128 + signum)

    def __enter__(self) -> "StopRequests":
        if _in_main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def worker_signals(parent: int) -> None:
    """For a worker process (a pool's initializer, given the pid of the process making the pool): Ctrl-C is
    its parent's to handle, which then ends the pool; SIGTERM, how the pool ends it, ends it quietly; and it
    dies with its parent, so none is orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):  # not Linux: the parent's `finally` still terminates the pool
        pass
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)

