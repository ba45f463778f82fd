"""``ComfyUIBackend``: one job = one ComfyUI prompt, from submission to downloaded outputs.

The life of a job:

1. Wait for a slot: at most ``1 + lookahead`` of our prompts are queued or running in one
   instance, on the least busy *usable* instance (reachable, and not busy with other people's
   prompts; see ``pool.py``). The GPU starts the next prompt while the worker is still
   downloading and uploading the previous result, and the backlog stays in our database
   instead of ComfyUI's volatile, hard-to-cancel queue.
2. Upload the job's input images to that instance (``/upload/image`` into ``imagen/<job id>/``,
   so no job ever loads another's), then POST. On the job's first claim the prompt id is
   derived from the job id (``pool.first_prompt_id``) and nothing is written first: a later
   attempt finds it by that id on every instance. A resubmission mints a uuid4, stores
   ``<prompt_id>@<base_url>`` as the job's backend ref, then POSTs.
3. Follow the socket until ``executing`` with ``node: null`` for our id, beside a slow
   ``/history`` poll so a dead or silent socket cannot hang the job (the events also feed the
   job's overall percentage and preview frames, see ``progress.py``); then read the history
   entry and decide. The slot is freed as soon as ComfyUI is done with the prompt.
4. Download every output through ``/view`` within ``max_output_bytes``, the main output first
   (``history.main_first``): in memory up to 8 MiB, streamed to a temporary file beyond. Unless
   ``keep_history``, ComfyUI then forgets the prompt (``POST /history {"delete": [ids]}``) off
   the job's path: the job goes on at once, and prompts finished meanwhile go in the same
   request (ComfyUI 0.3.64 has no API to delete the files themselves from its output directory).

Two budgets: ``queue_timeout`` for waiting (for a slot, then in ComfyUI's queue) and ``timeout``
for running, counted from ComfyUI starting *our* prompt. Past the queue budget the prompt is
taken back out of the queue and the job raises ``BackendUnavailable`` (the infrastructure was
busy, the job did nothing wrong); past the run budget it is interrupted and the job raises
``RetryableError``.

Outages: while every instance is down ``unavailable_reason`` says so and capacity is 0; both
recover on their own when a socket connects again (``notify_change`` each time). A job whose
instance dies, or that finds nothing to submit to, raises ``BackendUnavailable``; its retry
adopts the prompt if it survived (through the backend ref, or the first prompt id), unless
the instance answers but will not hand over its outputs: then it renders again.

Cancellation (the worker cancels the task): when the owner cancelled (``ctx.cancel_requested``),
the prompt is withdrawn: ``POST /api/jobs/{id}/cancel`` where the server has it, else ``POST
/queue {"delete"}`` while pending and ``POST /interrupt {"prompt_id"}`` while running. A cancel
during the POST waits for the POST to return first, so a slowly accepted prompt is withdrawn
too. When the worker only lets go, the prompt is left running for the next owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import shutil
import tempfile
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
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
    OutputDefaults,
)
from imagen_worker.backends.comfyui import failures, installed
from imagen_worker.backends.comfyui.client import (
    SOCKET_CONNECTED,
    SOCKET_DOWN,
    ComfyUIClient,
    FileRef,
    OutputTooLarge,
    PromptWatch,
)
from imagen_worker.backends.comfyui.config import ComfyUIConfig, parse_config
from imagen_worker.backends.comfyui.frames import SOCKET, Frame, SocketSaves, socket_savers
from imagen_worker.backends.comfyui.history import (
    class_type,
    finished,
    main_first,
    output_files,
    raise_for_outcome,
)
from imagen_worker.backends.comfyui.params import closed, params_model
from imagen_worker.backends.comfyui.pool import Instance, Pool, first_prompt_id, make_ref, parse_ref
from imagen_worker.backends.comfyui.progress import JobProgress
from imagen_worker.backends.comfyui.workflows import Workflow, WorkflowError, job_workflow, model_name
from imagen_worker.errors import BackendUnavailable, ConfigError, JobError, RetryableError, TerminalError

log = structlog.get_logger(__name__)

# How long finished prompts wait before ComfyUI is asked to forget them: until the job that
# finished is recorded, so the request never competes with it; jobs finishing meanwhile join.
FORGET_AFTER = 0.1

# How often a finished prompt's history entry is re-read when it is not there yet.
HISTORY_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)
# How long a prompt the poll found finished waits for the socket's trailing events (frames).
SOCKET_CATCH_UP = 2.0
# Consecutive failed polls (ComfyUI unreachable) before the job gives up and retries later.
MAX_POLL_FAILURES = 3
# Events that only come once ComfyUI executes the prompt: the run budget starts with the first.
_STARTED = frozenset(
    {"execution_start", "execution_cached", "executing", "executed", "progress", "progress_state"}
)


class Phase(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"


class Where(enum.Enum):
    """Where ComfyUI has our prompt, when it has not finished."""

    PENDING = "pending"
    RUNNING = "running"


class Withdrawal(enum.Enum):
    """What taking a prompt back out of ComfyUI did."""

    DELETED = "deleted"  # it was pending and is gone
    INTERRUPTED = "interrupted"  # it was running; it stops at the next node boundary
    ABSENT = "absent"  # already finished, or it never arrived
    UNREACHABLE = "unreachable"


@dataclass
class _Clock:
    """A prompt's two budgets: waiting in the queue, then running from its start."""

    queue_deadline: float
    run_for: float
    started: float | None = None

    @property
    def phase(self) -> Phase:
        return Phase.QUEUED if self.started is None else Phase.RUNNING

    @property
    def deadline(self) -> float:
        return self.queue_deadline if self.started is None else self.started + self.run_for

    def start(self) -> None:
        if self.started is None:
            self.started = asyncio.get_running_loop().time()


def _inputs_folder(request: GenerateRequest) -> str:
    """The job's folder in ComfyUI's input directory."""
    return f"imagen/{request.job_id}"


class _OverBudget(Exception):
    def __init__(self, phase: Phase) -> None:
        super().__init__(phase.value)
        self.phase = phase


class ComfyUIBackend(Backend):
    """Render jobs on one ComfyUI instance or a pool of them (see module docstring)."""

    type_name = "comfyui"

    def __init__(self, name: str, config: ComfyUIConfig) -> None:
        super().__init__(name)
        self.config = config
        self._instances = [
            Instance(
                ComfyUIClient(
                    url,
                    headers=config.headers,
                    connect_timeout=config.connect_timeout,
                    ping_interval=config.ping_interval,
                    ping_timeout=config.ping_timeout,
                )
            )
            for url in config.urls
        ]
        self._pool = Pool(
            self._instances,
            limit=1 + config.lookahead,
            recheck=config.poll_interval,
            on_change=self._pool_changed,
        )
        self._background: set[asyncio.Task[None]] = set()
        # Per instance, finished prompts whose history entries are still to be deleted.
        self._to_forget: dict[Instance, list[str]] = {}
        self._forgetting: set[asyncio.Task[None]] = set()
        # Per prompt, the nodes whose ``executed`` event arrived (and the SaveImageWebsocket
        # nodes, which send none, as they start), in the order they ran.
        self._executed: dict[str, list[str]] = {}
        # Per prompt, the images its SaveImageWebsocket nodes sent over the socket.
        self._saves: dict[str, SocketSaves] = {}
        # Where outputs are streamed until the pipeline has written them into place; removed
        # with everything left in it when the backend closes.
        self._spool: Path | None = None
        self._started = False
        self._last_seen: tuple[int, str | None] = (self.capacity, self.unavailable_reason)

    @classmethod
    def from_config(cls, name: str, block: Mapping[str, Any]) -> Self:
        return cls(name, parse_config(name, block))

    @property
    def capacity(self) -> int:
        """Per usable instance ``1 + lookahead`` in ComfyUI plus one in post-processing."""
        return sum(2 + self.config.lookahead for inst in self._instances if inst.usable)

    @property
    def unavailable_reason(self) -> str | None:
        if self._pool.all_down:
            return failures.UNAVAILABLE
        return failures.DISK_FULL if self._pool.all_held else None

    @property
    def unavailable_detail(self) -> str | None:
        instances = self._pool.instances
        if self._pool.all_down:
            return "no ComfyUI instance answers: " + ", ".join(inst.client.base_url for inst in instances)
        if self._pool.all_held:
            held = ", ".join(inst.client.base_url for inst in instances if inst.held)
            return f"ComfyUI cannot save images (a full, over-quota or read-only disk): {held}"
        return None

    def _pool_changed(self) -> None:
        seen = (self.capacity, self.unavailable_reason)
        if seen == self._last_seen:
            return
        was_down = self._last_seen[1] is not None
        self._last_seen = seen
        if seen[1] is not None and not was_down:
            log.warning("comfyui backend unavailable", backend=self.name, reason=seen[1])
        elif seen[1] is None and was_down:
            log.info("comfyui backend available again", backend=self.name)
        self.notify_change()

    @property
    def limits(self) -> Limits:
        return self.config.limits

    @property
    def output_defaults(self) -> OutputDefaults:
        return self.config.output_defaults

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
        checked = self.validate_params(request, model)
        if checked.n > 1:
            # n images are one latent batch: the workflow's batch_size binding carries it.
            if "batch_size" not in chosen.bindings:
                raise TerminalError(
                    f'n {checked.n} needs a batch: backend "{self.name}"\'s workflow has no batch_size '
                    "binding, so it makes one image per job",
                    detail={"n": checked.n},
                )
            if checked.params.get("batch_size", checked.n) != checked.n:
                raise TerminalError(
                    f"n {checked.n} and params.batch_size {checked.params['batch_size']} disagree; set one",
                    detail={"n": checked.n},
                )
            checked = dataclasses.replace(checked, params={**checked.params, "batch_size": checked.n})
        return checked

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for inst in self._instances:
            await inst.client.start()
        self._pool.start()
        await asyncio.gather(*(i.client.wait_answered(self.config.connect_timeout) for i in self._instances))
        # An instance too old for client-chosen prompt ids is refused now, in one line.
        for inst in self._instances:
            with contextlib.suppress(RetryableError, TerminalError):  # unreachable: checked later
                problem = await inst.client.version_problem()
                if problem is not None:
                    await self.aclose()
                    raise ConfigError(f'backend "{self.name}": {problem}')

    async def aclose(self) -> None:
        if self._forgetting:  # short requests: let them finish rather than leave entries behind
            await asyncio.wait(self._forgetting, timeout=self.config.connect_timeout)
        self._background |= self._forgetting
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._pool.aclose()
        for inst in self._instances:
            await inst.client.aclose()
        if self._spool is not None:
            await asyncio.to_thread(shutil.rmtree, self._spool, True)
            self._spool = None
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
                # Said of this instance: "http://gpu:8188: unreachable (connection refused)".
                said = failures.as_health(exc)
                lines.append(f"{client.base_url}: {said}")
                info[client.base_url] = {"ok": False, "error": said}
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
        first = ctx.first_claim and not ctx.backend_ref
        if not first:
            recovered = await self._recover(request, ctx)
            if recovered is not None:
                return recovered
        # A resubmission needs a fresh id: ComfyUI runs a second prompt under a known id and
        # overwrites the first one's history with it.
        prompt_id = first_prompt_id(request.job_id) if first else str(uuid.uuid4())
        planned = {
            name: f"{_inputs_folder(request)}/{name}.{image.extension}"
            for name, image in request.inputs.items()
        }
        graph = self._render(workflow, request, prompt_id, planned)  # bad params fail before taking a slot
        clock = self._clock()
        started = time.perf_counter()
        inst = await self._pool.acquire(prompt_id, within=self.config.queue_timeout)
        client = inst.client
        try:
            if not await client.wait_connected(self.config.connect_timeout):
                raise failures.unreachable(
                    client.base_url, f"no websocket after {self.config.connect_timeout:g} s"
                )
            uploaded = await self._upload_inputs(client, request)
            if uploaded != planned:
                graph = self._render(workflow, request, prompt_id, uploaded)
            if not first:
                await ctx.set_backend_ref(make_ref(prompt_id, client.base_url))
        except BaseException:
            self._pool.release(inst, prompt_id)
            raise
        # submit: a slot, a live socket, a resubmission's prompt id recorded; execute: POST /prompt until
        # ComfyUI says it is done; download: /history and /view of every output.
        submitted = time.perf_counter()
        saves = SocketSaves(graph, await self._spool_dir(), self.config.max_output_bytes)
        if saves:
            self._saves[prompt_id] = saves
        try:
            with client.watch(prompt_id) as watch:
                entry = await self._run_in_slot(inst, prompt_id, watch, ctx, graph, clock)
            executed = time.perf_counter()
            result = await self._collect(inst, prompt_id, entry, graph, request, saves)
        finally:
            self._executed.pop(prompt_id, None)
            self._saves.pop(prompt_id, None)
            saves.discard()  # whatever was not handed over in the result
        result.timings.update(
            submit=submitted - started, execute=executed - submitted, download=time.perf_counter() - executed
        )
        return result

    def _clock(self) -> _Clock:
        now = asyncio.get_running_loop().time()
        return _Clock(queue_deadline=now + self.config.queue_timeout, run_for=self.config.timeout)

    async def _run_in_slot(
        self,
        inst: Instance,
        prompt_id: str,
        watch: PromptWatch,
        ctx: JobContext,
        submit: dict[str, Any] | None,
        clock: _Clock,
    ) -> dict[str, Any]:
        """Submit (unless recovering) and follow the prompt; free the slot when ComfyUI is done."""
        posting: asyncio.Task[dict[str, Any]] | None = None
        handed_off = False
        try:
            try:
                if submit is not None:
                    # Shielded: a cancel must not cut the POST short, or the prompt could land
                    # after we looked for it and run unseen. The cancel acts once it returned.
                    posting = asyncio.ensure_future(inst.client.submit(submit, prompt_id))
                    answer = await asyncio.shield(posting)
                    if answer.get("node_errors"):
                        handed_off = True
                        await self._hand_off(inst, prompt_id, None, stop=True)
                        raise failures.rejection(answer, queued=True)
                progress = JobProgress(ctx, submit or {})
                return await self._until_done(inst, prompt_id, watch, progress, clock)
            except asyncio.CancelledError:
                handed_off = True
                await self._hand_off(inst, prompt_id, posting, stop=ctx.cancel_requested)
                raise
            except JobError as exc:
                self._forget_failed(inst, prompt_id, exc)
                raise
        finally:
            if not handed_off:
                self._pool.release(inst, prompt_id)

    async def _hand_off(
        self, inst: Instance, prompt_id: str, posting: asyncio.Task[Any] | None, *, stop: bool
    ) -> None:
        """Give the slot to a background task that stops the prompt (``stop``) and frees it.

        With ``stop`` this waits, up to ``interrupt_grace``, until the prompt was withdrawn, so
        a cancelled job ends only once ComfyUI dropped its prompt; an interrupted prompt stops
        only at the next node boundary, and the slot stays taken until it did.
        """
        withdrawn = asyncio.Event()
        self._spawn(self._stop_and_release(inst, prompt_id, posting, stop, withdrawn))
        if stop:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.interrupt_grace):
                    await withdrawn.wait()

    async def _stop_and_release(
        self,
        inst: Instance,
        prompt_id: str,
        posting: asyncio.Task[Any] | None,
        stop: bool,
        withdrawn: asyncio.Event,
    ) -> None:
        try:
            if posting is not None:
                with contextlib.suppress(Exception):
                    await posting  # a slow POST lands first, then it is withdrawn
            if stop:
                outcome = await self._withdraw(inst, prompt_id)
                withdrawn.set()
                if outcome is not Withdrawal.INTERRUPTED:
                    return
            await self._until_gone(inst, prompt_id)
            if stop and not self.config.keep_history:
                self._forget(inst, prompt_id)  # interrupted for good: nobody comes back for its entry
        finally:
            withdrawn.set()
            self._pool.release(inst, prompt_id)

    async def _until_gone(self, inst: Instance, prompt_id: str) -> None:
        """Wait (up to ``interrupt_grace``) until ComfyUI no longer holds the prompt."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.config.interrupt_grace
        while loop.time() < give_up:
            try:
                if prompt_id not in await inst.client.queue():
                    return
            except RetryableError:
                return
            await asyncio.sleep(min(0.1, self.config.poll_interval))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _workflow_for(self, request: GenerateRequest) -> Workflow:
        """The configured workflow, or the job's own from a trusted source (see ``check_request``)."""
        if request.workflow is None:
            return self.config.workflow
        try:
            return job_workflow(request.workflow)
        except WorkflowError as exc:
            raise TerminalError(f"the job's workflow cannot be used: {exc}") from None

    async def _upload_inputs(self, client: ComfyUIClient, request: GenerateRequest) -> dict[str, str]:
        """Each input image into the job's own folder of ComfyUI's input directory.

        Overwriting: a retry replaces its own files, and the folder is the job's alone.
        """
        names = {}
        for name, image in request.inputs.items():
            filename = f"{name}.{image.extension}"
            names[name] = await client.upload_image(
                image.data, filename, _inputs_folder(request), image.mime_type
            )
            log.info(
                "comfyui input uploaded",
                instance=client.base_url,
                input=name,
                name=names[name],
                bytes=len(image.data),
            )
        return names

    def _render(
        self, workflow: Workflow, request: GenerateRequest, prompt_id: str, images: Mapping[str, str]
    ) -> dict[str, Any]:
        # Unique per submission: a retry re-saves instead of being handed a cached, maybe
        # deleted file, and no job can ever receive another job's file.
        prefix = f"imagen/{request.job_id}/{prompt_id[:8]}"
        try:
            return workflow.render(request, prefix, images)
        except WorkflowError as exc:
            raise TerminalError(str(exc)) from None

    # --- following a prompt -------------------------------------------------------------

    async def _until_done(
        self, inst: Instance, prompt_id: str, watch: PromptWatch, progress: JobProgress, clock: _Clock
    ) -> dict[str, Any]:
        """Follow the prompt to its end, within its budgets (see module docstring)."""
        client = inst.client
        while True:
            try:
                return await self._follow(client, prompt_id, watch, progress, clock)
            except _OverBudget as over:
                if over.phase is Phase.RUNNING:
                    break
            entry = await self._take_back_unstarted(client, prompt_id)
            if entry is not None:
                return entry
            clock.start()  # it started just as the queue budget ran out: run it
        log.warning("comfyui prompt over its deadline", instance=client.base_url, prompt_id=prompt_id)
        state = await self._withdraw(inst, prompt_id)
        outcome = "it was removed from ComfyUI's queue"
        if state is Withdrawal.ABSENT:  # it ended just as the deadline passed
            with contextlib.suppress(RetryableError):
                entry = await client.history(prompt_id)
                if finished(entry) and entry["status"]["status_str"] == "success":
                    return entry
            outcome = "it is no longer in ComfyUI's queue"
        elif state is Withdrawal.UNREACHABLE:
            outcome = "ComfyUI could not be reached to stop it"
        elif state is Withdrawal.INTERRUPTED:
            outcome = "it was interrupted"
            grace = _Clock(queue_deadline=0.0, run_for=self.config.interrupt_grace)
            grace.start()
            try:
                entry = await self._follow(client, prompt_id, watch, None, grace)
            except (_OverBudget, RetryableError):
                outcome += (
                    f" but did not stop within {self.config.interrupt_grace:g} s; "
                    "the instance may need a restart"
                )
            else:
                if entry.get("status", {}).get("status_str") == "success":
                    return entry  # it finished during the grace period after all
        raise RetryableError(
            f"ComfyUI did not finish within {self.config.timeout:g} s of starting (prompt {prompt_id} on "
            f"{client.base_url}); {outcome}",
            detail={"instance": client.base_url, "prompt_id": prompt_id, "timeout": self.config.timeout},
        )

    async def _take_back_unstarted(self, client: ComfyUIClient, prompt_id: str) -> dict[str, Any] | None:
        """The queue budget ran out: delete the prompt if it is still pending, and raise.

        Returns the finished entry if it ended meanwhile, None if it runs now.
        """
        queue = await client.queue()
        if prompt_id in queue.pending:
            await client.delete_pending(prompt_id)  # pending only: harmless if it just started
            queue = await client.queue()
            if prompt_id not in queue.running:
                log.warning(
                    "comfyui prompt not started in time", instance=client.base_url, prompt_id=prompt_id
                )
                raise failures.not_started(client.base_url, prompt_id, self.config.queue_timeout)
        if prompt_id in queue.running:
            return None
        entry = await client.history(prompt_id)
        if finished(entry):
            return entry
        raise failures.lost(client.base_url, prompt_id)

    async def _follow(
        self,
        client: ComfyUIClient,
        prompt_id: str,
        watch: PromptWatch,
        progress: JobProgress | None,
        clock: _Clock,
    ) -> dict[str, Any]:
        """Return the finished history entry. Socket events drive it; the poll backs it up."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + self.config.poll_interval
        last_failure: dict[str, Any] | None = None
        poll_failures = 0
        while True:
            now = loop.time()
            if now >= clock.deadline:
                raise _OverBudget(clock.phase)
            event = await watch.get(min(next_poll, clock.deadline) - now)
            kind = event["type"] if event else None
            data: dict[str, Any] = event["data"] if event else {}
            if kind in _STARTED:
                clock.start()
            saves = self._saves.get(prompt_id)
            consumed = saves is not None and await saves.feed(kind, data)  # a frame is an output
            if progress is not None and not consumed:
                progress.feed(kind, data)
            if kind == "executing" and data.get("node") is None:
                return await self._final_entry(client, prompt_id, last_failure)
            ran = kind == "executed" and data.get("node") is not None
            sending = kind == "executing" and saves is not None and data.get("node") in saves.nodes
            if ran or sending:
                self._executed.setdefault(prompt_id, []).append(str(data["node"]))
            if kind in ("execution_error", "execution_interrupted"):
                last_failure = {"type": kind, "data": data}
            elif kind in (None, SOCKET_CONNECTED, SOCKET_DOWN):
                next_poll = loop.time() + self.config.poll_interval
                try:
                    where = await self._poll(client, prompt_id)
                except failures.PromptLost:
                    raise
                except RetryableError as exc:
                    poll_failures += 1
                    gone = kind == SOCKET_DOWN and isinstance(exc, BackendUnavailable)
                    if gone or poll_failures >= MAX_POLL_FAILURES:
                        raise  # a failed reconnect and a dead HTTP port: the instance is gone
                    continue
                poll_failures = 0
                if where is Where.RUNNING:
                    clock.start()
                elif isinstance(where, dict):
                    if saves is not None:
                        await self._catch_up(watch, saves, progress)
                    if progress is not None:  # the socket's own "done" may not have come yet
                        progress.feed("executing", {"node": None, "prompt_id": prompt_id})
                    return where

    async def _catch_up(self, watch: PromptWatch, saves: SocketSaves, progress: JobProgress | None) -> None:
        """The poll saw the prompt finished before the socket said so: read the events still on
        their way (SaveImageWebsocket frames among them) until ``executing`` null, or until the
        socket stays silent for ``SOCKET_CATCH_UP`` seconds (then what is missing is missing)."""
        while (event := await watch.get(SOCKET_CATCH_UP)) is not None:
            kind, data = event["type"], event["data"]
            if not await saves.feed(kind, data) and progress is not None:
                progress.feed(kind, data)
            if kind == "executing" and data.get("node") is None:
                return

    async def _poll(self, client: ComfyUIClient, prompt_id: str) -> dict[str, Any] | Where:
        """The finished entry, or where the prompt waits; raise if ComfyUI forgot the prompt."""
        entry = await client.history(prompt_id)
        if finished(entry):
            return entry
        queue = await client.queue()
        if prompt_id in queue.running:
            return Where.RUNNING
        if prompt_id in queue.pending:
            return Where.PENDING
        entry = await client.history(prompt_id)  # it may have finished between the two reads
        if finished(entry):
            return entry
        raise failures.lost(client.base_url, prompt_id)

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

    async def _withdraw(self, inst: Instance, prompt_id: str) -> Withdrawal:
        """Take our prompt out of ComfyUI, whether it waits or runs. Never a bare ``/interrupt``:
        it would stop whatever runs, maybe someone else's prompt."""
        client = inst.client
        try:
            cancelled = await client.cancel(prompt_id)
            if cancelled is None:
                outcome = await self._withdraw_in_two_steps(client, prompt_id)
            elif not cancelled:
                outcome = Withdrawal.ABSENT
            elif prompt_id in (await client.queue()).running:
                outcome = Withdrawal.INTERRUPTED
            else:
                outcome = Withdrawal.DELETED
        except (RetryableError, TerminalError) as exc:
            log.warning(
                "comfyui withdraw failed", instance=client.base_url, prompt_id=prompt_id, error=exc.message
            )
            return Withdrawal.UNREACHABLE
        log.info(
            "comfyui prompt withdrawn", instance=client.base_url, prompt_id=prompt_id, outcome=outcome.value
        )
        return outcome

    async def _withdraw_in_two_steps(self, client: ComfyUIClient, prompt_id: str) -> Withdrawal:
        """Servers without the Jobs API: delete while pending, targeted interrupt while running."""
        queue = await client.queue()
        if prompt_id in queue.pending:
            await client.delete_pending(prompt_id)
            queue = await client.queue()  # it may have started in between
            if prompt_id not in queue.running:
                return Withdrawal.DELETED
        if prompt_id not in queue.running:
            return Withdrawal.ABSENT
        await client.interrupt(prompt_id)
        return Withdrawal.INTERRUPTED

    # --- recovery -----------------------------------------------------------------------

    async def _recover(self, request: GenerateRequest, ctx: JobContext) -> GenerateResult | None:
        """An earlier attempt's prompt: collect it, wait for it, or return None to resubmit.

        That prompt is the one the backend ref names or, with no ref, the first claim's, on
        whichever instance knows it.
        """
        if ctx.backend_ref:
            ref = ctx.backend_ref
            parsed = parse_ref(ref)
            inst = next((i for i in self._instances if parsed and i.client.base_url == parsed[1]), None)
            if parsed is None or inst is None:
                log.info("comfyui backend ref not usable; submitting again", ref=ref)
                return None
            prompt_id = parsed[0]
        else:
            prompt_id = first_prompt_id(request.job_id)
            inst = await self._holder(prompt_id)
            if inst is None:
                log.info("comfyui first prompt not on any instance; submitting again", prompt_id=prompt_id)
                return None
            ref = make_ref(prompt_id, inst.client.base_url)
        try:
            return await self._adopt(inst, prompt_id, request, ctx, ref)
        finally:
            self._executed.pop(prompt_id, None)

    async def _holder(self, prompt_id: str) -> Instance | None:
        """The instance that has the prompt queued, running or in its history.

        The queue is read before the history: a prompt leaves the queue only once its history
        entry is written, so one that ends between the two reads is still found. An instance
        that does not answer is passed over, as an unreachable ref's instance is.
        """
        for inst in self._instances:
            try:
                if prompt_id in await inst.client.queue() or await inst.client.history(prompt_id):
                    return inst
            except RetryableError as exc:
                log.info(
                    "comfyui instance unreachable during recovery",
                    instance=inst.client.base_url, prompt_id=prompt_id, error=exc.message,
                )  # fmt: skip
        return None

    async def _adopt(
        self, inst: Instance, prompt_id: str, request: GenerateRequest, ctx: JobContext, ref: str
    ) -> GenerateResult | None:
        client = inst.client
        if socket_savers(self._workflow_for(request).graph):
            await self._abandon(inst, prompt_id, ref)
            return None
        with client.watch(prompt_id) as watch:
            try:
                entry = await client.history(prompt_id)
                waiting = not finished(entry) and prompt_id in await client.queue()
            except RetryableError as exc:
                log.info("comfyui instance unreachable during recovery", ref=ref, error=exc.message)
                return None
            if waiting:
                self._pool.occupy(inst, prompt_id)  # it is in ComfyUI already, whatever the limit says
                entry = await self._run_in_slot(inst, prompt_id, watch, ctx, None, self._clock())
        if not finished(entry) or entry.get("status", {}).get("status_str") != "success":
            # Unknown (restart, deleted) or failed: the queue asked for a retry, so run it again.
            log.info("comfyui earlier prompt unknown or failed; submitting again", ref=ref)
            return None
        prompt = entry.get("prompt")
        graph = (
            prompt[2] if isinstance(prompt, list) and len(prompt) > 2 and isinstance(prompt[2], dict) else {}
        )
        try:
            return await self._collect(inst, prompt_id, entry, graph, request)
        except BackendUnavailable:
            raise  # an outage: the next attempt adopts the prompt again once the instance answers
        except RetryableError as exc:
            # The instance answers but cannot hand over the outputs (its output folder was
            # cleared while the history stayed in memory): adopting the same prompt at every
            # retry would fail the job once its attempts ran out, so render it again.
            log.info(
                "comfyui earlier prompt's outputs could not be collected; submitting again",
                ref=ref, error=exc.message,
            )  # fmt: skip
            return None

    async def _abandon(self, inst: Instance, prompt_id: str, ref: str) -> None:
        """An earlier prompt with SaveImageWebsocket nodes cannot be adopted: their images went
        to the earlier attempt's socket, and ComfyUI keeps no copy. Withdraw it if it is still
        there (its images would reach no one) and submit again."""
        with contextlib.suppress(RetryableError, TerminalError):
            if prompt_id in await inst.client.queue():
                await self._withdraw(inst, prompt_id)
        log.info("comfyui earlier prompt sent its images to an earlier socket; submitting again", ref=ref)

    # --- outputs ------------------------------------------------------------------------

    async def _collect(
        self,
        inst: Instance,
        prompt_id: str,
        entry: dict[str, Any],
        graph: Mapping[str, Any],
        request: GenerateRequest,
        saves: SocketSaves | None = None,
    ) -> GenerateResult:
        """Every saved file, the main output first, streamed to disk; then ComfyUI forgets the prompt.

        ``saves`` holds the images SaveImageWebsocket nodes sent over the socket: outputs like
        any saved file, except that they are in the spool already.
        """
        client = inst.client
        executed = self._executed.pop(prompt_id, [])
        try:
            raise_for_outcome(entry, client.base_url)
        except JobError as exc:
            if isinstance(exc, failures.ServerDiskFull):
                seconds = self._pool.hold(inst)
                log.error(
                    "comfyui instance cannot save files; it takes no prompts for a while",
                    instance=client.base_url, error=exc.message, held_seconds=seconds,
                )  # fmt: skip
            self._forget_failed(inst, prompt_id, exc)
            raise
        self._pool.saved(inst)
        if saves is not None and saves.over_limit:
            raise self._too_large(prompt_id, sorted(saves.nodes))
        if saves is not None:
            saves.raise_if_incomplete(client.base_url, prompt_id)
        frames = {frame.ref: frame for frame in saves.frames} if saves is not None else {}
        files = output_files(entry, list(frames))
        if not any(ref.kind == "images" for ref in files):
            raise TerminalError(
                f"ComfyUI finished prompt {prompt_id} but the workflow saved no image; it needs a SaveImage, "
                "SaveImageWebsocket or PreviewImage node",
                detail={"instance": client.base_url, "prompt_id": prompt_id, "outputs": entry.get("outputs")},
            )
        try:
            files = main_first(files, graph, executed, self.config.output)
        except LookupError as exc:
            raise TerminalError(
                f'backend "{self.name}": {exc}',
                detail={"instance": client.base_url, "prompt_id": prompt_id, "output": self.config.output},
            ) from None
        outputs = await self._download_all(client, prompt_id, files, graph, frames)
        if saves is not None:
            saves.frames.clear()  # handed over: the outputs own the files now
        if not self.config.keep_history:
            self._forget(inst, prompt_id)
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
            "workflow_graph": dict(graph),
            "seed": request.seed,
            "outputs": [dict(output.origin) for output in outputs],
            "cached_nodes": cached,
            "history_kept": self.config.keep_history,
        }
        return GenerateResult(
            image=outputs[0], metadata=metadata, model=model_name(graph), extra_outputs=outputs[1:]
        )

    def _forget_failed(self, inst: Instance, prompt_id: str, error: JobError) -> None:
        """A prompt that failed or was interrupted in ComfyUI: a retry submits a new one, so
        nothing comes back for its history entry. An unreachable server holds none to forget."""
        ended_there = not isinstance(error, BackendUnavailable) or isinstance(error, failures.ServerDiskFull)
        if ended_there and not self.config.keep_history:
            self._forget(inst, prompt_id)

    def _forget(self, inst: Instance, prompt_id: str) -> None:
        waiting = self._to_forget.setdefault(inst, [])
        waiting.append(prompt_id)
        if len(waiting) == 1:  # otherwise the task already on its way takes it along
            task = asyncio.ensure_future(self._forget_waiting(inst))
            self._forgetting.add(task)
            task.add_done_callback(self._forgetting.discard)

    async def _forget_waiting(self, inst: Instance) -> None:
        await asyncio.sleep(FORGET_AFTER)
        while prompt_ids := self._to_forget.pop(inst, []):
            try:
                await inst.client.delete_history(prompt_ids)
            except RetryableError as exc:  # the outputs are safe; a leftover entry is only clutter
                log.warning("comfyui history entries not deleted", prompt_ids=prompt_ids, error=exc.message)

    async def _spool_dir(self) -> Path:
        if self._spool is None:
            self._spool = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="imagen-comfyui-"))
        return self._spool

    def _too_large(self, prompt_id: str, files: str | list[str]) -> TerminalError:
        return TerminalError(
            f"the outputs of ComfyUI prompt {prompt_id} are larger than backend "
            f'"{self.name}"\'s max_output_bytes ({self.config.max_output_bytes} bytes)',
            detail={"prompt_id": prompt_id, "file": files},
        )

    async def _download_all(
        self,
        client: ComfyUIClient,
        prompt_id: str,
        files: list[FileRef],
        graph: Mapping[str, Any],
        frames: Mapping[FileRef, Frame],
    ) -> list[Output]:
        """Each file in memory, or in its own file in the spool directory when large
        (``client.IN_MEMORY_BYTES``), all together within ``max_output_bytes`` (SaveImageWebsocket
        images are in the spool already and count against it too)."""
        outputs: list[Output] = []
        budget = self.config.max_output_bytes - sum(frame.size for frame in frames.values())
        spool = await self._spool_dir()
        try:
            for ref in files:
                data: bytes | None = None
                if ref.type == SOCKET:
                    frame = frames[ref]
                    path, size, mime, digest = frame.path, frame.size, frame.mime_type, frame.sha256
                    outputs.append(Output(path=path, name=ref.filename))
                else:
                    path = spool / uuid.uuid4().hex  # a fresh name: download_to creates it, if it streams
                    outputs.append(Output(path=path, name=ref.filename))
                    try:
                        data, size, mime, digest = await client.download_to(ref, path, budget)
                    except OutputTooLarge:
                        raise self._too_large(prompt_id, ref.filename) from None
                    budget -= size
                origin = {
                    "node_id": ref.node_id, "node_type": class_type(graph, ref.node_id), "kind": ref.kind,
                    "filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type,
                    "mime_type": mime, "bytes": size, "sha256": digest,
                }  # fmt: skip
                outputs[-1] = Output(
                    data=data or b"", path=path if data is None else None, mime_type=mime,
                    name=ref.filename, origin=origin,
                )  # fmt: skip
        except BaseException:
            for output in outputs:
                output.discard()
            raise
        return outputs
