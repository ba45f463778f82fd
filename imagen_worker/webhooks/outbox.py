"""The outbox loop: claim pending deliveries, POST each in its own task, record the outcome.

The database queues a delivery in the same transaction that ends a job (the
``jobs_queue_webhook`` trigger), so the job's completion never waits for a receiver and a
crash between the commit and the POST loses nothing: whichever worker claims the row next
sends it. Deliveries are at least once (a worker killed mid-request leaves the row to be
sent again); receivers deduplicate on ``X-Imagen-Delivery``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import os
from collections.abc import Callable
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from imagen_worker.config import WebhooksConfig
from imagen_worker.errors import ConfigError, said
from imagen_worker.queries import sql
from imagen_worker.webhooks.delivery import Rejected, Request, Retryable, Sender
from imagen_worker.webhooks.payload import body
from imagen_worker.worker.running import DB_ERRORS, Event

log = structlog.get_logger("imagen.webhooks")
MIN_SECRET = 16


class Outcome(enum.StrEnum):
    """What one attempt ended in, for metrics."""

    DELIVERED = "delivered"
    RETRIED = "retried"
    FAILED = "failed"


OnOutcome = Callable[[Outcome], None]


class Abandoned(Exception):
    """The row's lease passed to another worker: it sends the delivery, not this one."""


class Interrupted(Exception):
    """The worker is stopping: the row goes back to the outbox for the next claim."""


async def configure(pool: asyncpg.Pool, settings: WebhooksConfig | None) -> None:
    """Tell the trigger which job endings to queue: this worker's events, or none.

    The setting is one row for the whole fleet, so a worker whose block differs from the
    others' changes it for every worker: that is said in a warning, not left to be found.
    """
    events = [str(event) for event in settings.events] if settings is not None else []
    changed = await pool.fetchrow(sql("webhook_settings"), events)
    if changed is not None and changed["previous"] is not None:
        log.warning(
            "webhook events changed for the whole fleet: every worker should carry the same webhooks block",
            previous=list(changed["previous"]),
            events=events,
        )


def read_secret(settings: WebhooksConfig) -> bytes:
    """The signing secret from its environment variable; refuse to start without a real one."""
    value = os.environ.get(settings.secret_env, "")
    if not value:
        raise ConfigError(
            f"webhooks.secret_env: environment variable {settings.secret_env} is not set; "
            "export the signing secret there (for example: openssl rand -hex 32)"
        )
    if len(value) < MIN_SECRET:
        raise ConfigError(
            f"webhooks.secret_env: the secret in {settings.secret_env} is shorter than "
            f"{MIN_SECRET} characters; use a random one (for example: openssl rand -hex 32)"
        )
    return value.encode()


class Outbox:
    def __init__(
        self,
        pool: asyncpg.Pool,
        worker_id: UUID,
        settings: WebhooksConfig,
        secret: bytes,
        on_outcome: OnOutcome,
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.settings = settings
        self.secret = secret
        self.on_outcome = on_outcome
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.held: set[UUID] = set()
        self.lease = settings.timeout * 2  # an attempt plus the writes around it
        self._wait = wait_exponential_jitter(
            multiplier=settings.backoff_base, max=settings.backoff_max, jitter=settings.backoff_base
        )

    def job_ended(self, event: Event, _data: dict[str, Any]) -> None:
        """A worker hook: a job of this worker just ended, so its delivery is likely queued."""
        if event in (Event.DONE, Event.FAILED, Event.CANCELLED):
            self.wake.set()

    def stop(self) -> None:
        """Claim nothing more; attempts in flight finish (within ``timeout``), waiting ones return."""
        self.stopping.set()
        self.wake.set()

    async def run(self) -> None:
        """Claim and deliver until stopped; unfinished rows are handed to the next claim at once."""
        log.info(
            "webhooks on", host=self.settings.url.host, events=[str(e) for e in self.settings.events],
            concurrency=self.settings.concurrency,
        )  # fmt: skip
        try:
            async with (
                httpx.AsyncClient(follow_redirects=False, trust_env=False) as client,
                asyncio.TaskGroup() as deliveries,
            ):
                sender = Sender(client, str(self.settings.url), self.secret, self.settings.timeout)
                await self._loop(sender, deliveries)
        finally:
            with contextlib.suppress(*DB_ERRORS):
                async with asyncio.timeout(5):
                    await self.pool.execute(sql("webhook_release"), self.worker_id)

    async def _loop(self, sender: Sender, deliveries: asyncio.TaskGroup) -> None:
        timeout = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.wake.wait()
            self.wake.clear()
            if self.stopping.is_set():
                return
            timeout = self.settings.poll_interval
            free = self.settings.concurrency - len(self.held)
            if free <= 0:
                continue  # a finishing delivery wakes the loop
            try:
                rows = await self.pool.fetch(
                    sql("webhook_claim"), self.worker_id, free, self.lease, list(self.held)
                )
            except DB_ERRORS as exc:
                log.warning("could not claim webhook deliveries; retrying", error=said(exc))
                continue
            except Exception:  # a bug here must not take the daemon's task group down
                log.exception("webhook claim failed; retrying")
                continue
            for row in rows:
                self.held.add(row["id"])
                deliveries.create_task(self._deliver(sender, row), name=f"imagen-webhook-{row['id']}")
            if len(rows) == free:
                timeout = 0.0  # maybe more are due

    async def _deliver(self, sender: Sender, row: asyncpg.Record) -> None:
        bound = structlog.contextvars.bound_contextvars(
            delivery_id=str(row["id"]), job_id=str(row["job_id"]), webhook_event=row["event"]
        )
        try:
            with bound:
                await self._attempts(sender, row)
        except DB_ERRORS as exc:
            log.warning("webhook delivery interrupted; the row is retried after its lease", error=said(exc))
        except Exception:
            log.exception("webhook delivery failed unexpectedly; the row is retried after its lease")
        finally:
            self.held.discard(row["id"])
            self.wake.set()

    async def _attempts(self, sender: Sender, row: asyncpg.Record) -> None:
        delivery_id = row["id"]
        remaining = self.settings.max_attempts - row["attempts"]
        if remaining <= 0:
            await self._give_up(
                delivery_id, f"no attempts left: webhooks.max_attempts is {self.settings.max_attempts}",
                counted=0,
            )  # fmt: skip
            return
        job = await self.pool.fetchrow(sql("webhook_job"), row["job_id"])
        request = Request(str(delivery_id), row["event"], body(row, job))
        retrying = AsyncRetrying(
            stop=stop_after_attempt(remaining),
            wait=self._backoff,
            retry=retry_if_exception_type(Retryable),
            before_sleep=functools.partial(self._retry_later, delivery_id),
            sleep=self._sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if self.stopping.is_set():
                        raise Interrupted
                    await self._renew(delivery_id)
                    await sender.send(request)
        except Abandoned:
            log.warning("webhook delivery taken over by another worker")
            return
        except Interrupted:
            log.info("webhook delivery handed back: the worker is stopping")
            return
        except (Retryable, Rejected) as exc:
            await self._give_up(delivery_id, exc.message, counted=1)
            return
        await self.pool.execute(sql("webhook_delivered"), delivery_id, self.worker_id)
        self.on_outcome(Outcome.DELIVERED)
        log.info("webhook delivered", attempts=row["attempts"] + attempt.retry_state.attempt_number)

    async def _renew(self, delivery_id: UUID) -> None:
        """Hold the row for one more attempt, unless another worker took it meanwhile."""
        if await self.pool.fetchval(sql("webhook_renew"), delivery_id, self.worker_id, self.lease) is None:
            raise Abandoned

    async def _sleep(self, seconds: float) -> None:
        """The wait between attempts, cut short by a stop."""
        try:
            async with asyncio.timeout(seconds):
                await self.stopping.wait()
        except TimeoutError:
            return
        raise Interrupted

    def _backoff(self, state: RetryCallState) -> float:
        """Exponential with jitter; a receiver's ``Retry-After`` is honoured up to ``backoff_max``."""
        wait = self._wait(state)
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, Retryable) and error.retry_after is not None:
            wait = max(wait, min(error.retry_after, self.settings.backoff_max))
        return float(wait)

    async def _retry_later(self, delivery_id: UUID, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        message = error.message if isinstance(error, Retryable) else str(error)
        sleep = state.next_action.sleep if state.next_action is not None else 0.0
        await self.pool.execute(
            sql("webhook_retry_later"), delivery_id, self.worker_id, message,
            sleep + self.lease,
        )  # fmt: skip
        self.on_outcome(Outcome.RETRIED)
        log.warning("webhook attempt failed; retrying", error=message, retry_in=round(sleep, 2))

    async def _give_up(self, delivery_id: UUID, message: str, *, counted: int) -> None:
        await self.pool.execute(sql("webhook_failed"), delivery_id, self.worker_id, message, counted)
        self.on_outcome(Outcome.FAILED)
        log.error("webhook delivery failed", error=message)
