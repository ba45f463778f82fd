"""What operators see: structured logs, Prometheus metrics, health endpoints, systemd notify.

Logging convention: the daemon binds ``job_id``, ``backend`` and ``attempt`` on every log line
about a job (``log = log.bind(job_id=..., backend=..., attempt=...)`` or
``structlog.contextvars.bound_contextvars``), so ``journalctl -o cat | jq 'select(.job_id==...)'``
tells one job's whole story across retries and workers.
"""

from __future__ import annotations

from imagen_worker.observability.logging import config_secret_env_names, configure_logging

__all__ = ["config_secret_env_names", "configure_logging"]
