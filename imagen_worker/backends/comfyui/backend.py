"""``ComfyUIBackend``: one job = one ComfyUI prompt, from submission to downloaded outputs.

The life of a job:

1. Wait for a slot: at most ``1 + lookahead`` of our prompts are queued or running in one
   instance, on the least busy instance. The GPU starts the next prompt while the worker is
   still downloading and uploading the previous result, and the backlog stays in our database
   instead of ComfyUI's volatile, hard-to-cancel queue.
2. Mint a uuid4 prompt id, store ``<prompt_id>@<base_url>`` as the job's backend ref, then POST.
3. Follow the socket until ``executing`` with ``node: null`` for our id, beside a slow
   ``/history`` poll so a dead or silent socket cannot hang the job; then read the history
   entry and decide. The slot is freed as soon as ComfyUI is done with the prompt.
4. Download every output through ``/view``.

Cancellation (the worker cancels the task): when the owner cancelled (``ctx.cancel_requested``),
pending -> ``POST /queue {"delete"}``, running -> ``POST /interrupt {"prompt_id"}``, shielded,
then ``CancelledError`` propagates; when the worker only lets go, the prompt is left running. A deadline does
the same interrupt, waits ``interrupt_grace`` and raises ``RetryableError``. A prompt that
ComfyUI forgot (restart) raises ``RetryableError``; the retry's recovery step resubmits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import uuid
from collections.abc import Mapping
from typing import Any, Self

import structlog

from imagen_worker.backends.base import (
    Backend,
    GenerateRequest,
    GenerateResult,
    Health,
    JobContext,
    Limits,
    Output,
)
from imagen_worker.backends.comfyui import failures, installed
from imagen_worker.backends.comfyui.client import SOCKET_CONNECTED, ComfyUIClient, PromptWatch
from imagen_worker.backends.comfyui.config import ComfyUIConfig, parse_config
from imagen_worker.backends.comfyui.history import class_type, finished, output_files, raise_for_outcome
from imagen_worker.backends.comfyui.params import closed, params_model
from imagen_worker.backends.comfyui.pool import Instance, Pool, make_ref, parse_ref
from imagen_worker.backends.comfyui.workflows import Workflow, WorkflowError, job_workflow, model_name
from imagen_worker.errors import ConfigError, RetryableError, TerminalError

log = structlog.get_logger(__name__)

# How often a finished prompt's history entry is re-read when it is not there yet.
HISTORY_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)
# Consecutive failed polls (ComfyUI unreachable) before the job gives up and retries later.
MAX_POLL_FAILURES = 3


class _DeadlineExceeded(Exception):
    pass


class _PromptLost(RetryableError):
    """ComfyUI has neither history nor a queue entry for the prompt: it restarted or dropped it."""


class ComfyUIBackend(Backend):
    """Render jobs on one ComfyUI instance or a pool of them (see module docstring)."""

    type_name = "comfyui"

    def __init__(self, name: str, config: ComfyUIConfig) -> None:
        super().__init__(name)
        self.config = config
        self._instances = [
            Instance(ComfyUIClient(url, headers=config.headers, connect_timeout=config.connect_timeout))
            for url in config.urls
        ]
        self._pool = Pool(self._instances, limit=1 + config.lookahead)
        self._background: set[asyncio.Task[None]] = set()
        self._started = False

    @classmethod
    def from_config(cls, name: str, block: Mapping[str, Any]) -> Self:
        return cls(name, parse_config(name, block))

    @property
    def capacity(self) -> int:
        """``instances * (1 + lookahead)`` in ComfyUI plus one per instance in post-processing."""
        return len(self._instances) * (2 + self.config.lookahead)

    @property
    def limits(self) -> Limits:
        return self.config.limits

    def check_request(self, request: GenerateRequest) -> GenerateRequest:
        """Params against the workflow's model; a per-job workflow only from a trusted source."""
        params = dict(request.params)
        workflow = request.workflow
        if "workflow" in params or "bindings" in params:
            key = "workflow" if "workflow" in params else "bindings"
            if request.owner_user_id not in self.config.workflow_owners:
                raise TerminalError(
                    f'params.{key} is not allowed: backend "{self.name}" runs per-job workflows only '
                    "from its operator or from owners listed in its workflow_owners",
                    detail={"param": key},
                )
            workflow = {"graph": params.pop("workflow", None), "bindings": params.pop("bindings", None)}
        chosen = self._workflow_for(dataclasses.replace(request, workflow=workflow))
        model = (
            self.config.params
            if workflow is None
            else params_model(chosen, self.config.vocabulary, strict=False)
        )
        for key in sorted(closed(chosen, self.config.vocabulary) & set(params)):
            raise TerminalError(
                f'params.{key} is not allowed: backend "{self.name}" lists no {key} a job may choose '
                f"(its operator can list them under {key}s)",
                detail={"param": key},
            )
        request = dataclasses.replace(request, params=params, workflow=workflow)
        return self.validate_params(request, model)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for inst in self._instances:
            await inst.client.start()
        await asyncio.gather(*(i.client.wait_connected(self.config.connect_timeout) for i in self._instances))
        # An instance too old for client-chosen prompt ids is refused now, in one line.
        for inst in self._instances:
            with contextlib.suppress(RetryableError, TerminalError):  # unreachable: checked later
                problem = await inst.client.version_problem()
                if problem is not None:
                    await self.aclose()
                    raise ConfigError(f'backend "{self.name}": {problem}')

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for inst in self._instances:
            await inst.client.aclose()
        self._started = False

    async def health(self) -> Health:
        """Each instance's version, queue, socket, and whether it has every model the workflow
        and the allowlists name (from ``/object_info``); ok while one instance is fully usable."""
        await self.start()
        info: dict[str, Any] = {}
        lines = []
        usable = 0
        for inst in self._instances:
            client = inst.client
            try:
                await client.system_stats()
                queued = await client.queue_remaining()
                version = await client.version_problem()
                missing = await installed.problems(client, self.config.workflow, self.config.vocabulary)
            except (RetryableError, TerminalError) as exc:
                lines.append(exc.message)
                info[client.base_url] = {"ok": False, "error": exc.message}
                continue
            problems = [version] if version else missing
            socket = "socket connected" if client.connected else "socket down"
            summary = f"ComfyUI {client.version or '?'}, queue {queued}, {socket}"
            lines.append(
                f"{client.base_url}: {summary}; " + ("; ".join(problems) if problems else "models ok")
            )
            usable += not problems
            info[client.base_url] = {
                "ok": not problems,
                "comfyui_version": client.version,
                "queue_remaining": queued,
                "socket_connected": client.connected,
                "our_prompts": inst.active,
                "problems": problems,
            }
        # An instance that answers but lacks a model fails every job routed to it: not ok.
        wrong = any(entry.get("problems") for entry in info.values())
        return Health(ok=usable > 0 and not wrong, detail="; ".join(lines), info=info)

    # --- one job ----------------------------------------------------------------------

    async def generate(self, request: GenerateRequest, ctx: JobContext) -> GenerateResult:
        await self.start()
        workflow = self._workflow_for(request)
        if ctx.backend_ref:
            recovered = await self._recover(ctx.backend_ref, request, ctx)
            if recovered is not None:
                return recovered
        prompt_id = str(uuid.uuid4())
        graph = self._render(workflow, request, prompt_id)  # bad params fail before taking a slot
        inst = await self._pool.acquire()
        client = inst.client
        try:
            if not await client.wait_connected(self.config.connect_timeout):
                raise RetryableError(
                    f"ComfyUI at {client.base_url} is unreachable (no websocket after "
                    f"{self.config.connect_timeout:g} s)",
                    detail={"instance": client.base_url},
                )
            await ctx.set_backend_ref(make_ref(prompt_id, client.base_url))
        except BaseException:
            self._pool.release(inst)
            raise
        with client.watch(prompt_id) as watch:
            entry = await self._run_in_slot(inst, prompt_id, watch, ctx, submit=graph)
        return await self._collect(inst, prompt_id, entry, graph, request)

    async def _run_in_slot(
        self,
        inst: Instance,
        prompt_id: str,
        watch: PromptWatch,
        ctx: JobContext,
        submit: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Submit (unless recovering) and follow the prompt; free the slot when ComfyUI is done."""
        handed_off = False
        try:
            try:
                if submit is not None:
                    answer = await inst.client.submit(submit, prompt_id)
                    if answer.get("node_errors"):
                        handed_off = await asyncio.shield(self._abandon(inst, prompt_id))
                        raise failures.rejection(answer, queued=True)
                return await self._until_done(inst, prompt_id, watch, ctx)
            except asyncio.CancelledError:
                if ctx.cancel_requested:
                    handed_off = await asyncio.shield(self._abandon(inst, prompt_id))
                else:
                    # The worker only lets go (shutdown, lost lease): the prompt runs on for
                    # whoever takes the job next, who adopts it through backend_ref.
                    self._spawn(self._release_when_stopped(inst, prompt_id))
                    handed_off = True
                raise
        finally:
            if not handed_off:
                self._pool.release(inst)

    def _workflow_for(self, request: GenerateRequest) -> Workflow:
        """The configured workflow, or the job's own from a trusted source (see ``check_request``)."""
        if request.workflow is None:
            return self.config.workflow
        try:
            return job_workflow(request.workflow)
        except WorkflowError as exc:
            raise TerminalError(f"the job's workflow cannot be used: {exc}") from None

    def _render(self, workflow: Workflow, request: GenerateRequest, prompt_id: str) -> dict[str, Any]:
        # Unique per submission: a retry re-saves instead of being handed a cached, maybe
        # deleted file, and no job can ever receive another job's file.
        prefix = f"imagen/{request.job_id}/{prompt_id[:8]}"
        try:
            return workflow.render(request, prefix)
        except WorkflowError as exc:
            raise TerminalError(str(exc)) from None

    async def _until_done(
        self, inst: Instance, prompt_id: str, watch: PromptWatch, ctx: JobContext
    ) -> dict[str, Any]:
        """Follow the prompt to its end; past the deadline stop it and raise ``RetryableError``."""
        client = inst.client
        try:
            return await self._follow(client, prompt_id, watch, ctx, self.config.timeout)
        except _DeadlineExceeded:
            log.warning("comfyui prompt over its deadline", instance=client.base_url, prompt_id=prompt_id)
        state = await self._withdraw(inst, prompt_id)
        outcome = "it was removed from ComfyUI's queue before it started"
        if state == "absent":  # it ended just as the deadline passed
            with contextlib.suppress(RetryableError):
                entry = await client.history(prompt_id)
                if finished(entry) and entry["status"]["status_str"] == "success":
                    return entry
            outcome = "it is no longer in ComfyUI's queue"
        elif state == "unreachable":
            outcome = "ComfyUI could not be reached to stop it"
        elif state == "interrupted":
            outcome = "it was interrupted"
            try:
                entry = await self._follow(client, prompt_id, watch, None, self.config.interrupt_grace)
            except (_DeadlineExceeded, RetryableError):
                outcome += (
                    f" but did not stop within {self.config.interrupt_grace:g} s; "
                    "the instance may need a restart"
                )
            else:
                if entry.get("status", {}).get("status_str") == "success":
                    return entry  # it finished during the grace period after all
        raise RetryableError(
            f"ComfyUI did not finish within {self.config.timeout:g} s (prompt {prompt_id} on "
            f"{client.base_url}); {outcome}",
            detail={"instance": client.base_url, "prompt_id": prompt_id, "timeout": self.config.timeout},
        )

    async def _follow(
        self,
        client: ComfyUIClient,
        prompt_id: str,
        watch: PromptWatch,
        ctx: JobContext | None,
        within: float,
    ) -> dict[str, Any]:
        """Return the finished history entry. Socket events drive it; the poll backs it up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        next_poll = loop.time() + self.config.poll_interval
        last_failure: dict[str, Any] | None = None
        poll_failures = 0
        while True:
            now = loop.time()
            if now >= deadline:
                raise _DeadlineExceeded
            event = await watch.get(min(next_poll, deadline) - now)
            kind = event["type"] if event else None
            data: dict[str, Any] = event["data"] if event else {}
            if kind == "executing" and data.get("node") is None:
                return await self._final_entry(client, prompt_id, last_failure)
            if kind == "progress" and ctx is not None:
                ctx.report_progress(
                    float(data.get("value", 0)), float(data.get("max", 0)), node=data.get("node")
                )
            elif kind in ("execution_error", "execution_interrupted"):
                last_failure = {"type": kind, "data": data}
            elif kind is None or kind == SOCKET_CONNECTED:
                next_poll = loop.time() + self.config.poll_interval
                try:
                    entry = await self._poll(client, prompt_id)
                except _PromptLost:
                    raise
                except RetryableError:  # unreachable for a moment; a restart shows up as lost
                    poll_failures += 1
                    if poll_failures >= MAX_POLL_FAILURES:
                        raise
                    continue
                poll_failures = 0
                if entry is not None:
                    return entry

    async def _poll(self, client: ComfyUIClient, prompt_id: str) -> dict[str, Any] | None:
        """The finished entry, None while queued or running; raise if ComfyUI forgot the prompt."""
        entry = await client.history(prompt_id)
        if finished(entry):
            return entry
        if prompt_id in await client.queue():
            return None
        entry = await client.history(prompt_id)  # it may have finished between the two reads
        if finished(entry):
            return entry
        raise _PromptLost(
            f"ComfyUI at {client.base_url} no longer knows prompt {prompt_id} (restarted, or the prompt "
            "was removed from its queue); the job will be submitted again",
            detail={"instance": client.base_url, "prompt_id": prompt_id},
        )

    async def _final_entry(
        self, client: ComfyUIClient, prompt_id: str, last_failure: dict[str, Any] | None
    ) -> dict[str, Any]:
        """History after ``executing(null)``: always written by then, but be lenient."""
        for delay in (0.0, *HISTORY_RETRY_DELAYS):
            await asyncio.sleep(delay)
            entry = await client.history(prompt_id)
            if finished(entry):
                return entry
        if last_failure is not None:
            messages = [[last_failure["type"], last_failure["data"]]]
            return {
                "outputs": {},
                "status": {"status_str": "error", "completed": False, "messages": messages},
            }
        raise RetryableError(
            f"ComfyUI at {client.base_url} finished prompt {prompt_id} but has no history entry for it",
            detail={"instance": client.base_url, "prompt_id": prompt_id},
        )

    async def _withdraw(self, inst: Instance, prompt_id: str) -> str:
        """Take our prompt out of ComfyUI: delete it while pending, targeted interrupt if running.

        Returns ``deleted``, ``interrupted``, ``absent`` (already finished or never arrived) or
        ``unreachable``. Never a bare ``/interrupt``: it would stop whatever runs.
        """
        client = inst.client
        try:
            queue = await client.queue()
            if prompt_id in queue.pending:
                await client.delete_pending(prompt_id)
                queue = await client.queue()  # it may have started in between
                if prompt_id not in queue.running:
                    return "deleted"
            if prompt_id not in queue.running:
                return "absent"
            await client.interrupt(prompt_id)
        except (RetryableError, TerminalError) as exc:
            log.warning(
                "comfyui withdraw failed", instance=client.base_url, prompt_id=prompt_id, error=exc.message
            )
            return "unreachable"
        log.info("comfyui prompt interrupted", instance=client.base_url, prompt_id=prompt_id)
        return "interrupted"

    async def _abandon(self, inst: Instance, prompt_id: str) -> bool:
        """Withdraw without waiting; True when a background task now owns the slot.

        An interrupt lands only at the next node boundary, so the slot stays taken until
        ComfyUI has really stopped; the cancelled job does not wait for that.
        """
        if await self._withdraw(inst, prompt_id) != "interrupted":
            return False
        self._spawn(self._release_when_stopped(inst, prompt_id))
        return True

    async def _release_when_stopped(self, inst: Instance, prompt_id: str) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.interrupt_grace
        try:
            while loop.time() < give_up:
                try:
                    if prompt_id not in await inst.client.queue():
                        return
                except RetryableError:
                    return
                await asyncio.sleep(min(0.1, self.config.poll_interval))
        finally:
            self._pool.release(inst)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- recovery -----------------------------------------------------------------------

    async def _recover(self, ref: str, request: GenerateRequest, ctx: JobContext) -> GenerateResult | None:
        """An earlier attempt's prompt: collect it, wait for it, or return None to resubmit."""
        parsed = parse_ref(ref)
        inst = next((i for i in self._instances if parsed and i.client.base_url == parsed[1]), None)
        if parsed is None or inst is None:
            log.info("comfyui backend ref not usable; submitting again", ref=ref)
            return None
        prompt_id, client = parsed[0], inst.client
        with client.watch(prompt_id) as watch:
            try:
                entry = await client.history(prompt_id)
                waiting = not finished(entry) and prompt_id in await client.queue()
            except RetryableError as exc:
                log.info("comfyui instance unreachable during recovery", ref=ref, error=exc.message)
                return None
            if waiting:
                self._pool.occupy(inst)  # it is in ComfyUI already, whatever the limit says
                entry = await self._run_in_slot(inst, prompt_id, watch, ctx, submit=None)
        if not finished(entry) or entry.get("status", {}).get("status_str") != "success":
            # Unknown (restart, deleted) or failed: the queue asked for a retry, so run it again.
            log.info("comfyui earlier prompt unknown or failed; submitting again", ref=ref)
            return None
        prompt = entry.get("prompt")
        graph = (
            prompt[2] if isinstance(prompt, list) and len(prompt) > 2 and isinstance(prompt[2], dict) else {}
        )
        return await self._collect(inst, prompt_id, entry, graph, request)

    # --- outputs ------------------------------------------------------------------------

    async def _collect(
        self,
        inst: Instance,
        prompt_id: str,
        entry: dict[str, Any],
        graph: Mapping[str, Any],
        request: GenerateRequest,
    ) -> GenerateResult:
        client = inst.client
        raise_for_outcome(entry, client.base_url)
        files = output_files(entry)
        if not any(ref.kind == "images" for ref in files):
            raise TerminalError(
                f"ComfyUI finished prompt {prompt_id} but the workflow saved no image; it needs a SaveImage "
                "(or PreviewImage) node, SaveImageWebsocket output is not collected",
                detail={"instance": client.base_url, "prompt_id": prompt_id, "outputs": entry.get("outputs")},
            )
        outputs: list[Output] = []
        described: list[dict[str, Any]] = []
        for ref in files:
            data, mime = await client.download(ref)
            outputs.append(Output(data=data, mime_type=mime, name=ref.filename))
            described.append(
                {
                    "node_id": ref.node_id,
                    "node_type": class_type(graph, ref.node_id),
                    "kind": ref.kind,
                    "filename": ref.filename,
                    "subfolder": ref.subfolder,
                    "type": ref.type,
                    "mime_type": mime,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        if client.version is None:
            with contextlib.suppress(RetryableError):
                await client.system_stats()
        messages = entry.get("status", {}).get("messages") or []
        cached: list[str] = next(
            (m[1].get("nodes") for m in messages if m and m[0] == "execution_cached"), []
        )
        metadata = {
            "backend": "comfyui",
            "comfyui_version": client.version,
            "instance": client.base_url,
            "prompt_id": prompt_id,
            "client_id": client.client_id,
            "workflow": self.config.workflow.source if request.workflow is None else "the job's workflow",
            "seed": request.seed,
            "outputs": described,
            "cached_nodes": cached,
        }
        return GenerateResult(
            image=outputs[0], metadata=metadata, model=model_name(graph), extra_outputs=outputs[1:]
        )
