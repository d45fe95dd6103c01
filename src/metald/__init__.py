"""metald: a microVM manager."""

__version__ = "0.1.0"
