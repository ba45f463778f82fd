"""``imagen``: submit prompts to the queue, follow them, or generate in-process."""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import json
import re
import shutil
import signal
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from imagen_worker import backends as backend_registry
from imagen_worker import styles as style_presets
from imagen_worker.cli import common, failures, fleet, images, watch
from imagen_worker.cli.common import ConfigOption
from imagen_worker.cli.config_cmd import app as config_app
from imagen_worker.cli.db_cmd import app as db_app
from imagen_worker.cli.failures import Code, InputError, NothingThere
from imagen_worker.config import Config
from imagen_worker.errors import ConfigError, JobError
from imagen_worker.observability.logging import config_secret_env_names, configure_logging
from imagen_worker.pipeline import Pipeline, forget
from imagen_worker.queries import sql
from imagen_worker.queue import prune as pruning
from imagen_worker.queue.jobs import JobSpec, Queue
from imagen_worker.storage import create_sink, keys

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags without a "<bool>" type column
    no_args_is_help=True,
    help="Submit prompts to the imagen queue, follow them, or generate in-process.",
)
app.add_typer(config_app, name="config", help="Print a sample config, validate one, show the settings.")
app.add_typer(db_app, name="db", help="The embedded PostgreSQL: status and stop.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
PROGRAM = "imagen"

Prompt = Annotated[str, typer.Argument(metavar="PROMPT", help="What to draw.", show_default=False)]
JobId = Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id (from submit or list).")]
Backend_ = Annotated[str | None, typer.Option("--backend", "-b", help="Backend instance name.")]
Style = Annotated[str | None, typer.Option("--style", "-s", help="Style preset (see `imagen styles`).")]
Size = Annotated[str, typer.Option("--size", help="WIDTHxHEIGHT, multiples of 8 in 64..4096.")]
Priority = Annotated[int, typer.Option("--priority", help="-100..100; higher runs first.")]
Steps = Annotated[int | None, typer.Option("--steps", help="Sampling steps, 1..200.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed; chosen per job when omitted.")]
Negative = Annotated[str | None, typer.Option("--negative", help="Negative prompt.")]
Count = Annotated[int, typer.Option("-n", "--count", min=1, max=16, help="Images in the batch (1..16).")]
Format = Annotated[
    str | None,
    typer.Option("--format", help="png, webp or jpeg (default: the backend's format, else output.format)."),
]
Quality = Annotated[int | None, typer.Option("--quality", min=1, max=100, help="1..100 for webp and jpeg.")]
Params = Annotated[list[str], typer.Option("--param", "-p", help="Backend parameter KEY=VALUE (repeatable).")]
Images = Annotated[
    list[str],
    typer.Option(
        "--image",
        "-i",
        help="Input image NAME=FILE (repeatable), e.g. init=./cat.png: uploaded to the owner's "
        "Storage folder and bound to the workflow's image.NAME.",
    ),
]


@app.callback()
def _root(
    _version: Annotated[bool, failures.version_option(PROGRAM)] = False,
    _debug: failures.DebugFlag = False,
) -> None:
    """imagen: submit prompts to the queue, follow them, or generate in-process."""


def _check_input(
    prompt: str, size: str, steps: int | None, seed: int | None, negative: str | None, style: str | None,
    priority: int = 0,
) -> None:  # fmt: skip
    """Everything the database would refuse, refused here first with the allowed range; and a
    style the worker would fail the job for (the presets ship with the package)."""
    common.check_prompt(prompt)
    if negative is not None and len(negative) > common.PROMPT_MAX:
        raise InputError(f"--negative has {len(negative)} characters; at most {common.PROMPT_MAX}")
    common.parse_size(size)
    common.check_range("--steps", steps, common.STEPS)
    common.check_range("--seed", seed, common.SEED)
    if style and style not in style_presets.all_styles():
        close = difflib.get_close_matches(style, style_presets.all_styles(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InputError(f"--style {style!r} is not a style; {hint}`imagen styles` lists them")
    common.check_range("--priority", priority, common.PRIORITY)


def _spec(
    config: Config, prompt: str, backend: str | None, style: str | None, size: str, steps: int | None,
    seed: int | None, negative: str | None, params: list[str], priority: int = 0,
    owner: str | None = None, dedupe_key: str | None = None, n: int = 1, fmt: str | None = None,
    quality: int | None = None,
) -> JobSpec:  # fmt: skip
    width, height = common.parse_size(size)
    if fmt is not None and fmt not in ("png", "webp", "jpeg"):
        raise InputError(f"--format {fmt!r}: use png, webp or jpeg")
    return JobSpec(
        owner_user_id=common.owner_of(config, owner), prompt=prompt, negative_prompt=negative,
        backend=backend, style=style, width=width, height=height, steps=steps, seed=seed,
        params=common.parse_params(params), priority=priority, max_attempts=config.worker.max_attempts,
        dedupe_key=dedupe_key, n=n, format=fmt, quality=quality,
    )  # fmt: skip


@app.command()
def submit(
    prompt: Prompt,
    backend: Backend_ = None,
    style: Style = None,
    size: Size = "1024x1024",
    steps: Steps = None,
    seed: Seed = None,
    negative: Negative = None,
    param: Params = [],  # noqa: B006 - typer needs a literal default
    priority: Priority = 0,
    count: Count = 1,
    fmt: Format = None,
    quality: Quality = None,
    owner: Annotated[str | None, typer.Option("--owner", help="Owner user id (UUID).")] = None,
    dedupe_key: Annotated[
        str | None, typer.Option("--dedupe-key", help="Reuse a live job with this key.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow the job and print the image path.")
    ] = False,
    workflow: Annotated[
        str | None, typer.Option("--workflow", help="JSON file: this job's own workflow (operator only).")
    ] = None,
    image: Images = [],  # noqa: B006 - typer needs a literal default
    config_path: ConfigOption = None,
) -> None:
    """Enqueue a prompt; prints the job id (or, with --wait, each image's path)."""
    submitted: list[uuid.UUID] = []

    async def go() -> int:
        _check_input(prompt, size, steps, seed, negative, style, priority)
        wanted = images.parse(image)
        config = common.load(config_path)
        spec = _spec(
            config, prompt, backend, style, size, steps, seed, negative, param, priority, owner, dedupe_key,
            count, fmt, quality,
        )  # fmt: skip
        spec = await _with_images(config, spec, wanted)
        if workflow is not None:
            spec = dataclasses.replace(spec, workflow=_read_workflow(workflow))
        async with common.database(config) as conn:
            job_id, created = await Queue(conn).enqueue(spec)
            submitted.append(job_id)
            err.print(f"job {job_id} {'queued' if created else 'already queued (same dedupe key)'}")
            if not wait:
                out.print(str(job_id), highlight=False)
                return 0
            row = await watch.follow(conn, job_id, err)
            if row["status"] == "done":
                for path in await watch.image_paths(conn, job_id):
                    out.print(path, highlight=False, soft_wrap=True)
                return 0
            err.print(f"[red]job {row['status']}[/red]: {row['error'] or 'no reason recorded'}")
            return Code.FAILED if row["status"] == "failed" else Code.CANCELLED

    if wait:
        # `timeout 60 imagen submit --wait`, or a closed session: SIGTERM ends the wait the way
        # Ctrl-C does, with the line that says the job stays queued.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        code = common.run(PROGRAM, go)
    except KeyboardInterrupt:
        if not submitted:
            raise
        job = submitted[0]
        failures.report(
            PROGRAM, Code.INTERRUPTED,
            f"stopped following job {job}; it stays queued (cancel it with: imagen cancel {job})",
        )  # fmt: skip
        raise typer.Exit(Code.INTERRUPTED) from None
    raise typer.Exit(code)


async def _with_images(
    config: Config, spec: JobSpec, wanted: dict[str, Path], *, no_cloud: bool = False
) -> JobSpec:
    """The spec with ``params.images`` naming the uploaded files."""
    if not wanted:
        return spec
    keys = await images.upload(config, spec.owner_user_id, wanted, no_cloud=no_cloud)
    for name, key in keys.items():
        err.print(f"{wanted[name]} uploaded as {key}", highlight=False)
    named = spec.params.get("images")
    merged = {**(named if isinstance(named, dict) else {}), **keys}
    return dataclasses.replace(spec, params={**spec.params, "images": merged})


def _read_workflow(path: str) -> dict[str, Any]:
    """The file for ``--workflow``: an API-format graph, or ``{"graph": ..., "bindings": ...}``."""
    try:
        data = json.loads(Path(path).expanduser().read_text("utf-8"))
    except OSError as exc:
        raise ConfigError(f"--workflow: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"--workflow: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--workflow: {path} must hold a JSON object (an API-format workflow)")
    return data


def _parse_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InputError(f"not a job id: {value!r}") from None


def _checked_id(value: str) -> uuid.UUID:
    """The id, or the command's one-line usage failure before any connection is made."""
    ref: uuid.UUID = failures.guarded(PROGRAM, lambda: _parse_id(value))
    return ref


def _local_file(image: asyncpg.Record) -> Path | None:
    path = image["local_path"]  # from imagen.image_internals (get_image joins it)
    return Path(path) if path else None


def _uploaded_key(image: asyncpg.Record) -> str | None:
    """The object key in cloud storage; None when the image never left its machine."""
    key = str(image["storage_path"])
    return None if key.startswith(keys.LOCAL_PREFIX) else key


async def _signed_url(config: Config, key: str, ttl: int) -> str:
    sink = create_sink(config)
    try:
        if not sink.is_cloud:
            raise ConfigError("cloud storage is not configured (set SUPABASE_URL and SUPABASE_SERVICE_KEY)")
        return await sink.sign(key, ttl)
    finally:
        await sink.aclose()


@app.command()
def status(
    job_id: JobId,
    sign_url: Annotated[
        bool, typer.Option("--sign", help="Also print a signed download URL for the image.")
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """Show one job, and where its image is."""
    ref = _checked_id(job_id)

    async def go(conn: asyncpg.Connection, config: Config) -> int:
        row = await Queue(conn).get(ref)
        if row is None:
            err.print(f"no job {job_id}")
            return 1
        # Plain "key  value" lines, never cut to the terminal: paths and signed URLs are copied.
        lines: list[tuple[str, object]] = [
            (key, json.dumps(row[key]) if key == "progress" and row[key] is not None else row[key])
            for key in ("id", "status", "prompt", "backend", "style", "width", "height", "seed", "attempts",
                        "max_attempts", "priority", "run_at", "progress", "error", "image_id", "created_at",
                        "started_at", "finished_at")
        ]  # fmt: skip
        if row["status"] == "pending" and (waiting := watch.pending_label(row)) != "pending":
            lines.append(("waiting", waiting.removeprefix("pending: ")))
        if row["worker_id"] is not None:  # the last worker to claim it (imagen workers lists them)
            where = f" ({row['worker_host']}, pid {row['worker_pid']})" if row["worker_host"] else ""
            lines.append(("worker", f"{row['worker_id']}{where}"))
        images = await conn.fetch(sql("job_images"), ref)
        image = images[0] if images else None
        if len(images) > 1:
            lines.append(("images", len(images)))
        for each in images:
            # The main image's lines keep their plain names; the rest of a batch carry ".<index>".
            at = f".{each['index']}" if each["index"] else ""
            local = _local_file(each)
            object_key = _uploaded_key(each)
            here = local is not None and local.exists()
            lines.append((f"local_path{at}", f"{local}{'' if here else ' (not on this machine)'}"))
            lines.append((f"storage_key{at}", object_key or "not uploaded (local storage)"))
            if each["thumbnail_path"]:
                lines.append((f"thumbnail{at}", each["thumbnail_path"]))
            if sign_url and object_key:
                lines.append((f"signed_url{at}", await _signed_url(config, object_key, 3600)))
        for key, value in lines:
            print(f"{key:13} {'' if value is None else value}".rstrip())
        if sign_url and image is not None and _uploaded_key(image) is None:
            err.print("imagen: the image was not uploaded, so there is nothing to sign; it is at local_path")
        return 0

    raise typer.Exit(common.with_database(PROGRAM, config_path, go))


@app.command("open")
def open_image(
    reference: Annotated[str, typer.Argument(help="A job id or an image id.")],
    into: Annotated[
        Path | None,
        typer.Option("--into", help="Directory for a downloaded copy (default: output.directory)."),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """Print the image's local path; downloads it from cloud storage first when it is not here."""

    ref = _checked_id(reference)

    async def go(conn: asyncpg.Connection, config: Config) -> int:
        job = await Queue(conn).get(ref)
        image_id = job["image_id"] if job is not None else ref
        if job is not None and image_id is None:
            raise NothingThere(f"job {reference} is {job['status']}: it has no image yet")
        image = await conn.fetchrow(sql("get_image"), image_id)
        if image is None:
            raise NothingThere(f"no job or image {reference}")
        local = _local_file(image)
        if local is not None and local.is_file():
            print(local)
            return 0
        key = _uploaded_key(image)
        if key is None:
            raise NothingThere(f"the image was stored only at {local}, which is not on this machine")
        target = (into or config.output.directory).expanduser() / Path(key).name
        await _download(await _signed_url(config, key, 300), target)
        print(target)
        return 0

    raise typer.Exit(common.with_database(PROGRAM, config_path, go))


async def _download(url: str, target: Path) -> None:
    import httpx

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    async with httpx.AsyncClient(timeout=60) as client, client.stream("GET", url) as response:
        if response.status_code != 200:
            raise ConfigError(f"download failed: storage answered HTTP {response.status_code}")
        with partial.open("wb") as file:
            async for chunk in response.aiter_bytes():
                file.write(chunk)
    partial.replace(target)


@app.command("list")
def list_jobs(
    status: Annotated[
        str | None, typer.Option("--status", help="pending|running|done|failed|cancelled")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
    config_path: ConfigOption = None,
) -> None:
    """The newest jobs, one line each."""

    failures.guarded(PROGRAM, lambda: common.check_status(status))

    async def go(conn: asyncpg.Connection, _: Config) -> None:
        rows = await Queue(conn).recent(status, limit)
        # Plain aligned lines: full ids (users copy them into status/cancel), greppable, and
        # the prompt/error column is cut to the terminal instead of wrapping.
        width = shutil.get_terminal_size((120, 24)).columns
        print(f"{'id':36}  {'status':9}  {'created':14}  prompt / error")
        for row in rows:
            created = row["created_at"].strftime("%m-%d %H:%M:%S")
            text = row["prompt"].replace("\n", " ")
            if row["error"]:
                text = f"{text} -- {row['error']}"
            line = f"{row['id']!s:36}  {row['status']:9}  {created:14}  {text}"
            print(line if len(line) <= width else line[: width - 1] + "…")

    common.with_database(PROGRAM, config_path, go)


async def _unchanged(queue: Queue, ref: uuid.UUID, job_id: str, action: str) -> str:
    """Why a cancel or a retry changed nothing: no such job, or the state it is in."""
    row = await queue.get(ref)
    return f"no job {job_id}" if row is None else f"job {job_id} is {row['status']}; nothing to {action}"


@app.command()
def cancel(job_id: JobId, config_path: ConfigOption = None) -> None:
    """Cancel a job: pending ones at once, running ones as soon as their worker hears it."""
    ref = _checked_id(job_id)

    async def go(conn: asyncpg.Connection, _: Config) -> int:
        queue = Queue(conn)
        new_status = await queue.request_cancel(ref)
        if new_status is None:
            err.print(await _unchanged(queue, ref, job_id, "cancel"))
            return 1
        out.print("cancelled" if new_status == "cancelled" else "cancel requested (the job is running)")
        return 0

    raise typer.Exit(common.with_database(PROGRAM, config_path, go))


@app.command()
def retry(job_id: JobId, config_path: ConfigOption = None) -> None:
    """Queue a failed or cancelled job again, with a fresh set of attempts."""

    ref = _checked_id(job_id)

    async def go(conn: asyncpg.Connection, _: Config) -> int:
        queue = Queue(conn)
        if not await queue.retry(ref):
            err.print(await _unchanged(queue, ref, job_id, "retry"))
            return 1
        out.print("queued again")
        return 0

    raise typer.Exit(common.with_database(PROGRAM, config_path, go))


class _TerminalProgress:
    """JobContext for in-process generation: progress goes to stderr, nothing is stored."""

    backend_ref: str | None = None
    first_claim = True  # a fresh job id for every run
    cancel_requested = True  # Ctrl-C here means: stop the remote work too

    async def set_backend_ref(self, ref: str) -> None:
        self.backend_ref = ref

    def report_progress(self, value: float, maximum: float, **extra: Any) -> None:
        if sys.stderr.isatty():
            percent = extra.get("percent", 100 * value / maximum if maximum else 0)
            err.print(f"  {percent:5.1f}%  {extra.get('message') or ''}", end="\r", highlight=False)

    def report_preview(self, data: bytes, mime_type: str) -> None:
        """Previews are for web pages following a queued job; here the final image is near."""


@app.command()
def generate(
    prompt: Prompt,
    backend: Backend_ = None,
    style: Style = None,
    size: Size = "1024x1024",
    steps: Steps = None,
    seed: Seed = None,
    negative: Negative = None,
    param: Params = [],  # noqa: B006 - typer needs a literal default
    count: Count = 1,
    fmt: Format = None,
    quality: Quality = None,
    no_cloud: Annotated[
        bool, typer.Option("--no-cloud", help="Do not upload, whatever the config says.")
    ] = False,
    image: Images = [],  # noqa: B006 - typer needs a literal default
    config_path: ConfigOption = None,
) -> None:
    """Run the pipeline here, without the queue; prints only the image paths on stdout."""

    async def go() -> int:
        _check_input(prompt, size, steps, seed, negative, style)
        wanted = images.parse(image)
        config = common.load(config_path)
        # Backends log (structlog's default is stdout): warnings only, on stderr, so stdout
        # stays the image path alone.
        configure_logging("warning", secret_env=config_secret_env_names(config))
        spec = _spec(
            config, prompt, backend, style, size, steps, seed, negative, param, n=count, fmt=fmt,
            quality=quality,
        )  # fmt: skip
        spec = await _with_images(config, spec, wanted, no_cloud=no_cloud)
        name = backend or config.default_backend_name()
        if name not in config.backend_blocks():
            raise ConfigError(f"unknown backend {name!r} (configured: {', '.join(config.backend_blocks())})")
        chosen = backend_registry.create(name, config.backend_blocks()[name])
        await chosen.start()
        sink = create_sink(config, no_cloud=no_cloud)
        job_id = uuid.uuid4()
        try:
            pipeline = Pipeline({name: chosen}, name, sink, config.output)
            # A new job id: no earlier attempt left a journal to resume.
            artifact = await pipeline.run(
                job_id, spec, _TerminalProgress(), strict_upload=False, resume=False
            )
        except JobError as exc:
            err.print(f"imagen: {exc.message}", highlight=False)
            return 1
        finally:
            await chosen.aclose()
            await sink.aclose()
        forget(config.output.directory, job_id)
        if artifact.upload_error is not None:
            err.print(f"imagen: cloud sync: {artifact.upload_error.message}", highlight=False)
        for picture in artifact.pictures:
            print(picture.image_path)
        return 0

    raise typer.Exit(common.run(PROGRAM, go))


@app.command("backends")
def list_backends(config_path: ConfigOption = None) -> None:
    """Configured backend instances and their health."""

    async def go() -> int:
        config = common.load(config_path)
        table = Table("name", "type", "default", "healthy", "detail")
        unhealthy = 0
        for name, block in config.backend_blocks().items():
            try:
                backend = backend_registry.create(name, block)
                await backend.start()
                try:
                    health = await asyncio.wait_for(backend.health(), timeout=10)
                finally:
                    await backend.aclose()
                ok, detail = health.ok, health.detail
            except (ConfigError, JobError, OSError, TimeoutError) as exc:
                ok, detail = False, str(exc)
            unhealthy += not ok
            table.add_row(
                name, str(block.get("type")), "yes" if name == config.default_backend_name() else "",
                "[green]yes[/green]" if ok else "[red]no[/red]", detail,
            )  # fmt: skip
        out.print(table)
        return 1 if unhealthy else 0

    raise typer.Exit(common.run(PROGRAM, go))


@app.command("workers")
def list_workers(config_path: ConfigOption = None) -> None:
    """The workers in the registry: live, draining, silent, stopped or lost, their jobs and
    backends (* = default), and why a backend takes no work. Exits 1 when no worker is live."""

    async def go(conn: asyncpg.Connection, _: Config) -> int:
        rows = await Queue(conn).workers()
        for line in fleet.lines(rows):
            print(line)
        print(fleet.summary(rows))
        return 0 if any(fleet.answering(row) for row in rows) else 1

    raise typer.Exit(common.with_database(PROGRAM, config_path, go))


_AGE = re.compile(r"(\d+)\s*([mhdw])")
_AGE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _age(text: str) -> timedelta:
    """``30d``, ``12h``, ``2w``, ``90m``: how long a finished job is kept."""
    match = _AGE.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise InputError(f"--older-than {text!r}: expected a positive age like 30d, 12h, 2w or 90m")
    return timedelta(**{_AGE_UNITS[match[2]]: int(match[1])})


@app.command()
def prune(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", metavar="AGE", help="Remove what ended longer ago than this: 30d, 12h, 2w, 90m."
        ),
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would go; remove nothing.")] = False,
    config_path: ConfigOption = None,
) -> None:
    """Remove jobs that ended (done, failed, cancelled) and settled webhook deliveries older
    than --older-than. Pending and running jobs are never touched; images stay."""
    age = failures.guarded(PROGRAM, lambda: _age(older_than))

    async def go(conn: asyncpg.Connection, _: Config) -> None:
        before = datetime.now(UTC) - age
        if dry_run:
            found = await pruning.prunable(conn, before)
            print(f"would remove {found.describe()} that ended before {before:%Y-%m-%d %H:%M} UTC")
            return
        removed = await pruning.prune(conn, before)
        print(f"removed {removed.describe()} that ended before {before:%Y-%m-%d %H:%M} UTC; images stay")

    common.with_database(PROGRAM, config_path, go)


@app.command("styles")
def list_styles() -> None:
    """Style presets a job's `style` may name."""
    table = Table("style", "description", "prompt template")
    for preset in style_presets.all_styles().values():
        table.add_row(preset.name, preset.description, preset.prompt)
    out.print(table)


@app.command()
def sign(
    reference: Annotated[str, typer.Argument(help="An image id, a job id, or a storage path.")],
    ttl: Annotated[int, typer.Option("--ttl", min=1, help="Seconds the URL stays valid.")] = 3600,
    config_path: ConfigOption = None,
) -> None:
    """Print a signed URL that lets anyone holding it download the image for --ttl seconds."""

    async def go() -> None:
        config = common.load(config_path)
        key = reference
        try:
            ref_id = uuid.UUID(reference)
        except ValueError:
            ref_id = None
        if ref_id is not None:
            async with common.database(config) as conn:
                row = await conn.fetchrow(sql("storage_path_of"), ref_id)
            if row is None:
                raise NothingThere(f"no image or job {reference}")
            if row["storage_path"] is None:
                raise NothingThere(f"job {reference} is {row['job_status']}: it has no image yet")
            key = row["storage_path"]
        if key.startswith(keys.LOCAL_PREFIX):
            raise NothingThere(
                f"the image was not uploaded, so there is nothing to sign; `imagen open {reference}` "
                "prints where it is on the worker's disk"
            )
        sink = create_sink(config)
        try:
            if not sink.is_cloud:
                raise ConfigError(
                    "cloud storage is not configured (set SUPABASE_URL and SUPABASE_SERVICE_KEY)"
                )
            print(await sink.sign(key, ttl))
        finally:
            await sink.aclose()

    try:
        common.run(PROGRAM, go)
    except JobError as exc:
        raise common.fail(PROGRAM, exc.message) from None


def main() -> None:
    failures.main(app, PROGRAM)


if __name__ == "__main__":
    main()
