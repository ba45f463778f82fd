"""How a command fails: one line on stderr (or one JSON line), and an exit code per cause.

Scripts and systemd tell causes apart by the exit code alone (the numbers follow BSD
``sysexits.h``, which systemd knows by name: ``RestartPreventExitStatus=EX_CONFIG``); people
read the line. A traceback is printed only with ``--debug`` (or ``IMAGEN_DEBUG=1``).
"""

from __future__ import annotations

import errno
import json
import os
import select
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from enum import IntEnum
from typing import Annotated, Any, NoReturn

import asyncpg
import typer

from imagen_worker.errors import ConfigError, EmbeddedServerError, JobError, SchemaError


class Code(IntEnum):
    """Exit codes; docs/operations.md lists them for operators."""

    OK = 0
    FAILED = 1  # the command's own "no": a failed job, a failing check, nothing to cancel
    CANCELLED = 2  # `imagen submit --wait` followed a job that ended cancelled
    USAGE = 64  # bad flags or input (EX_USAGE)
    SCHEMA = 65  # migrations pending, or an applied migration was edited (EX_DATAERR)
    DATABASE_MISSING = 66  # the server answers but the database does not exist (EX_NOINPUT)
    DATABASE_DOWN = 69  # the database server cannot be reached (EX_UNAVAILABLE)
    INTERNAL = 70  # a bug: run again with --debug for the traceback (EX_SOFTWARE)
    PORT_IN_USE = 71  # metrics.port is taken (EX_OSERR)
    CANT_WRITE = 73  # a file or directory cannot be written (EX_CANTCREAT)
    CREDENTIALS = 77  # credentials missing or refused: storage keys, database password (EX_NOPERM)
    CONFIG = 78  # the configuration is missing or invalid (EX_CONFIG)
    INTERRUPTED = 130  # Ctrl-C


class InputError(ConfigError):
    """A flag or argument the command refuses before it reaches the database."""


class NothingThere(Exception):
    """The command's own "no": what it was asked about does not exist or has no image (exit 1)."""


class PortInUse(OSError):
    """``metrics.port`` is taken; raised before the worker registers anywhere."""


class _State:
    debug = os.environ.get("IMAGEN_DEBUG", "").lower() in ("1", "true", "yes")
    json_lines = False  # set by `imagen-worker run` once its log format is known
    database = "the database"  # host:port/name of the database the command talks to


state = _State()


def set_database(target: str) -> None:
    state.database = target


def classify(exc: BaseException) -> tuple[Code, str]:
    """The exit code and the one sentence for a failure."""
    from imagen_worker.storage.keys import MissingCredentials

    where = state.database
    if isinstance(exc, InputError):
        return Code.USAGE, str(exc)
    if isinstance(exc, NothingThere):
        return Code.FAILED, str(exc)
    if isinstance(exc, SchemaError):
        return Code.SCHEMA, str(exc)
    if isinstance(exc, MissingCredentials):
        return Code.CREDENTIALS, str(exc)
    if isinstance(exc, ConfigError):
        return Code.CONFIG, str(exc)
    if isinstance(exc, JobError):
        return Code.FAILED, exc.message
    if isinstance(exc, EmbeddedServerError):
        return Code.DATABASE_DOWN, str(exc)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return Code.DATABASE_MISSING, (
            f"database {where}: {exc}; create it (createdb) and run `imagen-worker migrate`"
        )
    if isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
        return Code.CREDENTIALS, f"database {where}: {exc}"
    if isinstance(exc, PortInUse):
        return Code.PORT_IN_USE, exc.strerror or str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return Code.PORT_IN_USE, f"metrics.port: {exc.strerror} (set metrics.port to a free port, 0 = any)"
    if isinstance(exc, PermissionError | IsADirectoryError | NotADirectoryError) and exc.filename:
        return Code.CANT_WRITE, f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, OSError | TimeoutError | asyncpg.CannotConnectNowError):
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc) or "timed out")
        return Code.DATABASE_DOWN, f"cannot connect to the database at {where}: {reason}"
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return Code.FAILED, f"database {where}: {exc}"
    return Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"


def report(program: str, code: int, message: str) -> None:
    """Print the failure line: plain text, or one JSON record like the daemon's log lines."""
    from imagen_worker.observability.logging import Redactor

    message = Redactor.from_env().scrub(message)
    if state.json_lines:
        record = {
            "event": message,
            "level": "error",
            "logger": program,
            "exit_code": int(code),
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        print(json.dumps(record), file=sys.stderr, flush=True)
    else:
        print(f"{program}: {message}", file=sys.stderr, flush=True)


def fail(program: str, exc: BaseException) -> typer.Exit:
    """The ``typer.Exit`` for ``exc`` after its line is printed; re-raises it under --debug."""
    if state.debug:
        raise exc
    code, message = classify(exc)
    report(program, code, message)
    return typer.Exit(int(code))


def guarded(program: str, action: Callable[[], Any]) -> Any:
    """Run a command body so any failure becomes its line and exit code."""
    try:
        return action()
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and output_closed():
            raise  # click stops without a word (exit 1), as it does for its own output
        raise fail(program, exc) from None


def output_closed() -> bool:
    """Whether stdout is a pipe whose reader went away (``imagen list | head``), as opposed to a
    broken socket: the kernel flags the write end of such a pipe with POLLERR."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _fd, events in poller.poll(0))
    except (OSError, ValueError):
        return False


# ``--debug`` on every program: ``main`` takes it from anywhere on the command line; declared so
# that it shows in the help and the parser accepts it.
DebugFlag = Annotated[bool, typer.Option("--debug", help="Print tracebacks instead of one line per failure.")]


def version_option(program: str) -> Any:
    """``--version``: the installed package's version, printed before anything else runs."""
    from importlib.metadata import PackageNotFoundError, version

    def show(value: bool) -> None:
        if value:
            try:
                number = version("imagen-worker")
            except PackageNotFoundError:
                number = "unknown (not installed)"
            typer.echo(f"{program} {number}")
            raise typer.Exit()

    return typer.Option("--version", callback=show, is_eager=True, help="Print the version and exit.")


def main(app: typer.Typer, program: str, argv: Sequence[str] | None = None) -> NoReturn:
    """The console-script entry point: ``--debug`` anywhere, usage errors as one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args.remove("--debug")
        state.debug = True
    command = typer.main.get_command(app)
    try:
        code = command.main(args, prog_name=program, standalone_mode=False)
    except typer.TyperException as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(Code.OK)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        report(program, Code.USAGE, f"{exc.format_message()}{hint}")
        sys.exit(Code.USAGE)
    except (typer.Abort, KeyboardInterrupt):
        report(program, Code.INTERRUPTED, "interrupted")
        sys.exit(Code.INTERRUPTED)
    except Exception as exc:
        if state.debug:
            raise
        failure, message = classify(exc)
        report(program, failure, message)
        sys.exit(failure)
    sys.exit(code if isinstance(code, int) else 0)
