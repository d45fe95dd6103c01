"""`metald serve`: run the daemon in the foreground."""

from __future__ import annotations


def serve() -> None:
    """Run the daemon in the foreground."""
    from metald.app import run

    run()
