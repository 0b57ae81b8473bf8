"""Signal set-up for the tests' child processes."""
from __future__ import annotations

import signal


def default_sigint() -> None:
    """In the child (``preexec_fn``): SIGINT's default action. A pytest started in the background by a
    non-interactive shell (``cmd &``) ignores SIGINT, children inherit that, and the app rightly keeps an
    ignored signal ignored (serving/supervise.close_on_signals), so a SIGINT test would then test the shell
    that started pytest, not the app."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
