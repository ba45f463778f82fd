"""The long-running worker: listener, claim loop, heartbeats, job execution, shutdown."""
