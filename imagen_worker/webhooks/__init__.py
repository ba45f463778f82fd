"""Completion webhooks: a signed JSON POST when a job ends, delivered from a database outbox."""
