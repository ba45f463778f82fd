"""imagen-worker: turn rows in a Postgres table into generated images."""

__version__ = "0.1.0"
