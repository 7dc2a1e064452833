"""The SQL server: a line protocol over mutual TLS in front of SQLite."""
