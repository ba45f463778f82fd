"""Configuration: file location, environment overrides, every problem reported with its key path.

The autouse ``_isolated_env`` fixture clears ``IMAGEN_*``/``DATABASE_URL`` and points ``HOME``
at an empty directory (so the default ``~/.config/imagen.yaml`` is missing), so each test
states exactly the environment it needs.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from imagen_worker import backends, storage
from imagen_worker.cli import config_cmd
from imagen_worker.config import (
    Config,
    MetricsConfig,
    OutputConfig,
    WorkerConfig,
    collect_problems,
    load_config,
    resolve_path,
)
from imagen_worker.errors import ConfigError

runner = CliRunner()


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    _, problems = collect_problems(path)
    return problems


@pytest.fixture
def sample_file(tmp_path: Path) -> Path:
    return write(tmp_path / "imagen.yaml", config_cmd.sample_text())


# --- the sample ---------------------------------------------------------------------------


def test_the_sample_loads_without_problems(sample_file: Path) -> None:
    config = load_config(sample_file)

    assert config.source_path == sample_file
    assert config.backend_blocks() == {"mock": {"type": "mock"}}


def test_the_sample_passes_imagen_config_validate(sample_file: Path) -> None:
    result = runner.invoke(config_cmd.app, ["validate", str(sample_file)])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok: {sample_file} (from --config)\n"


def test_imagen_config_sample_prints_the_packaged_sample(sample_file: Path) -> None:
    result = runner.invoke(config_cmd.app, ["sample"])

    assert result.exit_code == 0
    assert result.stdout == sample_file.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("section", "model"),
    [("worker", WorkerConfig), ("output", OutputConfig), ("metrics", MetricsConfig)],
)
def test_the_sample_shows_every_key_of_a_section(section: str, model: type[Any], sample_file: Path) -> None:
    data = yaml.safe_load(sample_file.read_text(encoding="utf-8"))

    assert set(data[section]) == set(model.model_fields)


def test_the_sample_documents_every_top_level_key(sample_file: Path) -> None:
    data = yaml.safe_load(sample_file.read_text(encoding="utf-8"))

    assert set(data) == set(Config.model_fields) - {"source_path"}


def test_the_sample_storage_block_names_env_vars_not_secrets(sample_file: Path) -> None:
    data = yaml.safe_load(sample_file.read_text(encoding="utf-8"))

    assert data["storage"] == {
        "type": "supabase",
        "bucket": "imagen-generated",
        "url_env": "SUPABASE_URL",
        "key_env": "SUPABASE_SERVICE_KEY",
    }


def test_the_sample_carries_a_commented_out_comfyui_backend(sample_file: Path) -> None:
    lines = [line.strip() for line in sample_file.read_text(encoding="utf-8").splitlines()]
    start = lines.index("# comfyui:")
    uncommented = ["comfyui:"]
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        uncommented.append(line.removeprefix("#"))

    block = yaml.safe_load("\n".join(uncommented))["comfyui"]

    assert block == {
        "type": "comfyui",
        "base_url": "http://127.0.0.1:8188",
        "workflow": "sdxl",
        "timeout": 600,
        "lookahead": 1,
    }


# --- secrets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key_path"),
    [
        ("backends:\n  replicate:\n    type: replicate\n    api_key: r8_abc\n", "backends.replicate.api_key"),
        ("backends:\n  x:\n    type: mock\n    token: t0k3n\n", "backends.x.token"),
        ("storage:\n  type: supabase\n  key: eyJhbGciOi\n", "storage.key"),
        ("storage:\n  type: s3\n  secret: abc\n", "storage.secret"),
        (
            "backends:\n  x:\n    type: mock\n    headers:\n      - password: hunter2\n",
            "backends.x.headers[0].password",
        ),
    ],
)
def test_an_inline_secret_is_rejected_with_its_key_path(tmp_path: Path, text: str, key_path: str) -> None:
    problems = problems_of(write(tmp_path / "imagen.yaml", text))

    assert any(problem.startswith(f"{key_path}: secrets must not be written") for problem in problems), (
        problems
    )


def test_a_secret_named_by_its_env_var_is_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "imagen.yaml",
        """\
        backends:
          replicate: {type: replicate, api_key_env: REPLICATE_API_TOKEN}
        storage: {type: supabase, key_env: SUPABASE_SERVICE_KEY}
        """,
    )

    assert problems_of(path) == []


# --- environment overrides ----------------------------------------------------------------


def test_an_env_var_overrides_one_key_and_keeps_the_rest_of_the_files_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "imagen.yaml", "worker:\n  concurrency: 2\n  poll_interval: 1.5\n")
    monkeypatch.setenv("IMAGEN_WORKER__CONCURRENCY", "8")

    worker = load_config(path).worker

    assert (worker.concurrency, worker.poll_interval) == (8, 1.5)


def test_an_invalid_env_override_is_reported_with_its_key_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_WORKER__CONCURRENCY", "0")

    _, problems = collect_problems()

    assert problems == [
        "worker.concurrency: Input should be greater than or equal to 1 (from $IMAGEN_WORKER__CONCURRENCY)"
    ]


def test_imagen_database_url_overrides_database_url_in_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "imagen.yaml", "database:\n  url: postgresql://from-file/db\n")
    monkeypatch.setenv("IMAGEN_DATABASE_URL", "postgresql://from-env/db")
    monkeypatch.setenv("DATABASE_URL", "postgresql://fallback/db")

    assert load_config(path).database_url() == "postgresql://from-env/db"


def test_database_url_in_the_file_wins_over_the_generic_database_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "imagen.yaml", "database:\n  url: postgresql://from-file/db\n")
    monkeypatch.setenv("DATABASE_URL", "postgresql://fallback/db")

    assert load_config(path).database_url() == "postgresql://from-file/db"


def test_the_generic_database_url_is_only_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://fallback/db")

    assert load_config().database_url() == "postgresql://fallback/db"


def test_no_database_configured_anywhere_means_the_embedded_server() -> None:
    assert load_config().database_url() is None


# --- where the file is read from ----------------------------------------------------------


def test_an_explicit_config_path_wins_over_imagen_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = write(tmp_path / "explicit.yaml", "worker: {concurrency: 7}\n")
    monkeypatch.setenv("IMAGEN_CONFIG", str(write(tmp_path / "env.yaml", "worker: {concurrency: 5}\n")))

    assert load_config(explicit).worker.concurrency == 7


def test_imagen_config_wins_over_the_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".config").mkdir()
    write(tmp_path / ".config" / "imagen.yaml", "worker: {concurrency: 3}\n")
    monkeypatch.setenv("IMAGEN_CONFIG", str(write(tmp_path / "env.yaml", "worker: {concurrency: 5}\n")))

    assert load_config().worker.concurrency == 5


def test_the_default_path_is_in_the_users_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("IMAGEN_CONFIG", raising=False)
    (tmp_path / ".config").mkdir()
    default = write(tmp_path / ".config" / "imagen.yaml", "worker: {concurrency: 3}\n")

    config = load_config()

    assert resolve_path(None) == default
    assert (config.worker.concurrency, config.source_path) == (3, default)


def test_a_missing_default_file_means_defaults() -> None:
    config = load_config()

    assert config.source_path is None
    assert config.worker == WorkerConfig()
    assert config.backend_blocks() == {"mock": {"type": "mock"}}
    assert config.storage == {"type": "supabase"}


def test_an_empty_file_means_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "imagen.yaml", "# nothing yet\n"))

    assert config.worker == WorkerConfig()


# --- problems with their key paths --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour: blue\n", "colour: Extra inputs are not permitted"),
        ("worker:\n  concurency: 4\n", "worker.concurency: Extra inputs are not permitted"),
        ("output:\n  folder: /tmp\n", "output.folder: Extra inputs are not permitted"),
        ("database:\n  host: db\n", "database.host: Extra inputs are not permitted"),
    ],
)
def test_an_unknown_key_is_reported_with_its_path(tmp_path: Path, text: str, expected: str) -> None:
    assert problems_of(write(tmp_path / "imagen.yaml", text)) == [expected]


@pytest.mark.parametrize(
    ("naming", "reason"),
    [
        ("{date}-{prompt}.{ext}", "unknown placeholder(s) ['prompt']"),
        ("{date}-{slug}.png", "must end with the {ext} placeholder"),
        ("../{slug}.{ext}", "must be a relative path inside output.directory"),
        ("/etc/{slug}.{ext}", "must be a relative path inside output.directory"),
    ],
)
def test_an_invalid_naming_template_is_reported_under_output_naming(
    tmp_path: Path, naming: str, reason: str
) -> None:
    problems = problems_of(write(tmp_path / "imagen.yaml", f'output:\n  naming: "{naming}"\n'))

    assert len(problems) == 1
    assert problems[0].startswith("output.naming: ")
    assert reason in problems[0]


def test_a_file_that_is_not_yaml_is_reported_with_its_path(tmp_path: Path) -> None:
    path = write(tmp_path / "imagen.yaml", "worker: [unclosed\n")

    problems = problems_of(path)

    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: not valid YAML")


def test_load_config_raises_one_config_error_listing_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path / "imagen.yaml", "worker:\n  concurrency: 0\n  bogus: 1\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "worker.concurrency: " in str(caught.value)
    assert "worker.bogus: " in str(caught.value)


def test_an_environment_variable_a_typo_away_from_a_setting_is_a_problem_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEN_DATABASE_ULR", "postgresql://db/queue")  # would mean the embedded server
    monkeypatch.setenv("IMAGEN_WROKER__CONCURRENCY", "4")
    for own in ("IMAGEN_TEST_DATABASE_URL", "IMAGEN_SUPABASE_KEY", "IMAGEN_RELEASE"):  # a deployment's own
        monkeypatch.setenv(own, "x")

    _, problems = collect_problems(write(tmp_path / "imagen.yaml", "worker:\n  concurrency: 2\n"))

    assert problems == [
        "$IMAGEN_DATABASE_ULR is not a setting: did you mean $IMAGEN_DATABASE_URL?",
        "$IMAGEN_WROKER__CONCURRENCY is not a setting: did you mean $IMAGEN_WORKER__CONCURRENCY?",
    ]


# --- imagen config validate ---------------------------------------------------------------


def test_validate_exits_non_zero_and_prints_every_problem_with_its_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path / "imagen.yaml",
        """\
        worker:
          concurrency: 0
          bogus: true
        output:
          naming: "{nope}.{ext}"
        backends:
          replicate: {type: replicate, api_key: r8_abc}
        """,
    )

    result = runner.invoke(config_cmd.app, ["validate", str(path)])

    assert result.exit_code == 1
    for key_path in (
        "worker.concurrency",
        "worker.bogus",
        "output.naming",
        "backends.replicate.api_key",
        "backends.replicate",
    ):
        assert f"error: {key_path}: " in result.stderr, key_path
    assert result.stderr.endswith(f"{path}: 5 problems\n")


def test_validate_reports_a_backend_block_its_adapter_refuses(tmp_path: Path) -> None:
    path = write(tmp_path / "imagen.yaml", "backends:\n  fast: {type: mock, fail_rate: 2}\n")

    result = runner.invoke(config_cmd.app, ["validate", str(path)])

    assert result.exit_code == 1
    assert 'error: backends.fast: backend "fast": fail_rate' in result.stderr


def test_validate_reports_an_unknown_backend_type(tmp_path: Path) -> None:
    path = write(tmp_path / "imagen.yaml", "backends:\n  gpu: {type: stable-cascade}\n")

    result = runner.invoke(config_cmd.app, ["validate", str(path)])

    assert result.exit_code == 1
    assert "error: backends.gpu: unknown backend type 'stable-cascade'" in result.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("default_backend: gpu\n", "error: default_backend: 'gpu' is not a configured backend"),
        (
            "worker:\n  backends: [mock, gpu]\n",
            "error: worker.backends[1]: 'gpu' is not a configured backend",
        ),
    ],
)
def test_validate_reports_a_reference_to_a_backend_that_is_not_configured(
    tmp_path: Path, text: str, expected: str
) -> None:
    result = runner.invoke(config_cmd.app, ["validate", str(write(tmp_path / "imagen.yaml", text))])

    assert result.exit_code == 1
    assert expected in result.stderr


def test_validate_of_a_path_that_does_not_exist_fails(tmp_path: Path) -> None:
    result = runner.invoke(config_cmd.app, ["validate", str(tmp_path / "typo.yaml")])

    assert result.exit_code == 1
    assert f"error: config file {tmp_path / 'typo.yaml'} (from --config) does not exist" in result.stderr


def test_an_explicit_path_that_does_not_exist_is_one_line_never_the_defaults(tmp_path: Path) -> None:
    typo = tmp_path / "imagn.yaml"

    with pytest.raises(ConfigError) as raised:
        load_config(typo)

    assert str(raised.value) == f"config file {typo} (from --config) does not exist"


def test_imagen_config_naming_a_missing_file_is_an_error_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEN_CONFIG", str(tmp_path / "gone.yaml"))

    with pytest.raises(ConfigError, match=r"gone.yaml \(from \$IMAGEN_CONFIG\) does not exist"):
        load_config()
    assert runner.invoke(config_cmd.app, ["validate"]).exit_code == 1


def test_an_empty_imagen_config_means_the_default_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_CONFIG", "")

    assert load_config().source_path is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("off", "off"), ("on", "on"), ("false", "off"), ("yes", "on"), ("'off'", "off"), ("auto", "auto")],
)
def test_cloud_sync_takes_yaml_booleans_as_meant(tmp_path: Path, text: str, expected: str) -> None:
    config = load_config(write(tmp_path / "imagen.yaml", f"output: {{cloud_sync: {text}}}\n"))

    assert config.output.cloud_sync == expected


def test_config_show_prints_every_value_with_its_source_and_masks_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = write(
        tmp_path / "imagen.yaml",
        """\
        worker: {concurrency: 7}
        backends:
          gpu: {type: mock, latency_ms: 5}
        storage: {type: supabase, key_env: MY_STORAGE_KEY}
        """,
    )
    monkeypatch.setenv("IMAGEN_WORKER__LEASE_SECONDS", "12")
    monkeypatch.setenv("IMAGEN_DATABASE_URL", "postgresql://imagen:hunter2-secret@db.internal:5432/q")
    monkeypatch.setenv("IMAGEN_BACKENDS__GPU__HEADERS__AUTHORIZATION", "PROXY_AUTH")

    result = runner.invoke(config_cmd.app, ["show", "-c", str(file)])

    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines()[1:]}
    assert result.stdout.splitlines()[0] == f"# config file: {file} (from --config)"
    assert lines["worker.concurrency"].split() == ["7", "file"]
    assert lines["worker.lease_seconds"].split() == ["12.0", "env", "IMAGEN_WORKER__LEASE_SECONDS"]
    assert lines["worker.max_attempts"].split() == ["3", "default"]
    assert lines["backends.gpu.latency_ms"].split() == ["5", "file"]
    assert lines["storage.key_env"].split() == ["MY_STORAGE_KEY", "(not", "set)", "file"]
    assert lines["backends.gpu.headers.authorization"].startswith("PROXY_AUTH (not set)")
    assert "hunter2" not in result.stdout
    assert lines["database.url"].endswith("env IMAGEN_DATABASE_URL")


def test_config_show_of_a_missing_explicit_file_fails_in_one_line(tmp_path: Path) -> None:
    result = runner.invoke(config_cmd.app, ["show", "-c", str(tmp_path / "typo.yaml")])

    assert result.exit_code == 78  # EX_CONFIG
    assert result.stderr == f"imagen: config file {tmp_path / 'typo.yaml'} (from --config) does not exist\n"


def test_validate_without_a_file_checks_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_WORKER__CONCURRENCY", "12")

    result = runner.invoke(config_cmd.app, ["validate"])

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ")
    assert "(no file: defaults and environment)" in result.stdout


def test_validate_prints_the_storage_owner_warning_without_failing(
    sample_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Config] = []

    def owner_warning(config: Config) -> str:
        seen.append(config)
        return "storage: owner_user_id is not set; uploads are filed under 'anonymous'"

    monkeypatch.setattr(storage, "owner_warning", owner_warning, raising=False)

    result = runner.invoke(config_cmd.app, ["validate", str(sample_file)])

    assert result.exit_code == 0
    assert "warning: storage: owner_user_id is not set" in result.stderr
    assert len(seen) == 1


@pytest.mark.parametrize(
    ("text", "unset", "expected"),
    [
        (
            "webhooks:\n  url: https://hooks.example.com/imagen\n",
            "IMAGEN_WEBHOOK_SECRET",
            "error: webhooks.secret_env: environment variable IMAGEN_WEBHOOK_SECRET is not set",
        ),
        (
            "output:\n  cloud_sync: on\nowner_user_id: 00000000-0000-4000-8000-0000000000a1\n",
            "SUPABASE_URL",
            "error: storage: Supabase credentials missing: set SUPABASE_URL and SUPABASE_SERVICE_KEY",
        ),
    ],
    ids=["webhooks without the signing secret", "cloud sync on without Storage credentials"],
)
def test_validate_fails_where_the_worker_would_refuse_to_start_for_a_missing_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, unset: str, expected: str
) -> None:
    monkeypatch.delenv(unset, raising=False)
    path = write(tmp_path / "imagen.yaml", text)

    result = runner.invoke(config_cmd.app, ["validate", str(path)])

    assert result.exit_code == 1
    assert result.stderr.startswith(expected), result.stderr


def test_validate_warns_about_a_password_in_the_files_database_url(tmp_path: Path) -> None:
    path = write(tmp_path / "imagen.yaml", "database:\n  url: postgresql://imagen:hunter2@db/imagen\n")

    result = runner.invoke(config_cmd.app, ["validate", str(path)])

    assert result.exit_code == 0
    assert "warning: database.url: the URL carries a password" in result.stderr


def test_validate_reports_a_storage_block_the_sink_refuses(
    sample_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def owner_warning(config: Config) -> str:
        raise ConfigError("storage: bucket must be a bucket name, got ''")

    monkeypatch.setattr(storage, "owner_warning", owner_warning, raising=False)

    result = runner.invoke(config_cmd.app, ["validate", str(sample_file)])

    assert result.exit_code == 1
    assert "error: storage: bucket must be a bucket name" in result.stderr


def test_adapter_values_from_the_environment_are_typed_like_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_BACKENDS__GPU__TYPE", "comfyui")
    monkeypatch.setenv("IMAGEN_BACKENDS__GPU__BASE_URL", "http://127.0.0.1:8188")
    monkeypatch.setenv("IMAGEN_BACKENDS__GPU__WORKFLOW", "sdxl")
    monkeypatch.setenv("IMAGEN_BACKENDS__GPU__TIMEOUT", "900")
    monkeypatch.setenv("IMAGEN_BACKENDS__GPU__LOOKAHEAD", "2")
    monkeypatch.setenv("IMAGEN_BACKENDS__GPU__MAX_BATCH", "2")
    monkeypatch.setenv("IMAGEN_STORAGE__TIMEOUT", "12.5")
    config = load_config()
    block = config.backends["gpu"]
    assert (block["timeout"], block["lookahead"], block["max_batch"]) == (900, 2, 2)
    assert block["base_url"] == "http://127.0.0.1:8188" and block["workflow"] == "sdxl"
    assert config.storage["timeout"] == 12.5
    backend = backends.create("gpu", block)
    assert backend.capacity == 4, "1 instance x (2 + lookahead 2)"
