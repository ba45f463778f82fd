"""Database access: connection settings, the embedded default server, migrations."""
