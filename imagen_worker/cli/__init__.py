"""Command-line entry points: ``imagen-worker`` (daemon, admin) and ``imagen`` (users)."""
