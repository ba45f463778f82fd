"""The job queue: the state machine of ``imagen.jobs`` and every statement it runs."""
