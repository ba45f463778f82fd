"""Which sink a run uses: the cloud-sync precedence chain, create_sink, the owner warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagen_worker.config import Config, load_config
from imagen_worker.errors import ConfigError
from imagen_worker.storage import create_sink, effective_cloud_sync, owner_warning
from imagen_worker.storage.local import LocalSink
from imagen_worker.storage.supabase import SupabaseSink

OWNER = "6f1c1a8e-3a55-4a8b-9a3e-1c1d2e3f4a5b"


def _config(tmp_path: Path, text: str = "") -> Config:
    path = tmp_path / "imagen.yaml"
    path.write_text(f"output:\n  directory: {tmp_path / 'out'}\n{text}", encoding="utf-8")
    return load_config(path)


def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://abc.supabase.co")
    monkeypatch.setenv("SUPABASE_SERVICE_KEY", "service-secret")


# --- effective_cloud_sync ----------------------------------------------------------------


def test_the_default_is_auto(tmp_path: Path) -> None:
    assert effective_cloud_sync(_config(tmp_path)) == "auto"


def test_the_config_file_value_is_used_when_nothing_overrides_it(tmp_path: Path) -> None:
    assert effective_cloud_sync(_config(tmp_path, "  cloud_sync: 'on'\n")) == "on"


def test_the_nested_env_variable_overrides_the_file_through_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEN_OUTPUT__CLOUD_SYNC", "off")

    assert effective_cloud_sync(_config(tmp_path, "  cloud_sync: 'on'\n")) == "off"


def test_imagen_cloud_sync_beats_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path, "  cloud_sync: 'off'\n")
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "ON")

    assert effective_cloud_sync(config) == "on"


def test_no_cloud_beats_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(tmp_path, "  cloud_sync: 'on'\n")
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "on")

    assert effective_cloud_sync(config, no_cloud=True) == "off"


@pytest.mark.parametrize(("raw", "mode"), [("false", "off"), ("No", "off"), ("true", "on"), ("yes", "on")])
def test_imagen_cloud_sync_takes_the_same_switch_words_as_the_file(
    raw: str, mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", raw)

    assert effective_cloud_sync(_config(tmp_path)) == mode


def test_an_invalid_imagen_cloud_sync_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "sometimes")

    with pytest.raises(ConfigError, match=r"\$IMAGEN_CLOUD_SYNC='sometimes': use auto, on or off"):
        effective_cloud_sync(_config(tmp_path))


# --- create_sink -------------------------------------------------------------------------


def test_off_gives_the_local_sink_even_with_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _credentials(monkeypatch)

    sink = create_sink(_config(tmp_path), no_cloud=True)

    assert isinstance(sink, LocalSink) and sink.in_place and not sink.is_cloud


def test_auto_without_credentials_falls_back_to_local(tmp_path: Path) -> None:
    assert isinstance(create_sink(_config(tmp_path)), LocalSink)


def test_auto_with_credentials_uploads_to_supabase(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _credentials(monkeypatch)

    sink = create_sink(_config(tmp_path))

    assert isinstance(sink, SupabaseSink) and sink.is_cloud


def test_auto_accepts_the_mai_fallback_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_URL", "https://abc.supabase.co")
    monkeypatch.setenv("MAI_SUPABASE_KEY", "service-secret")

    assert isinstance(create_sink(_config(tmp_path)), SupabaseSink)


def test_on_without_credentials_names_the_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "on")

    with pytest.raises(ConfigError) as caught:
        create_sink(_config(tmp_path))

    assert "SUPABASE_URL" in str(caught.value)
    assert "SUPABASE_SERVICE_KEY or MAI_SUPABASE_KEY" in str(caught.value)


def test_a_broken_storage_block_fails_in_auto_instead_of_silently_going_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _credentials(monkeypatch)
    config = _config(tmp_path, "storage:\n  type: supabase\n  buckett: typo\n")

    with pytest.raises(ConfigError, match="buckett"):
        create_sink(config)


def test_an_unknown_storage_type_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown type 's3'.*local, supabase"):
        create_sink(_config(tmp_path, "storage:\n  type: s3\n"))


def test_a_configured_local_block_is_used_in_every_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, f"storage:\n  type: local\n  directory: {tmp_path / 'nas'}\n")
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "on")

    on = create_sink(config)
    off = create_sink(config, no_cloud=True)

    for sink in (on, off):
        assert isinstance(sink, LocalSink)
        assert sink.directory == tmp_path / "nas"


# --- owner_warning -----------------------------------------------------------------------


def test_cloud_sync_on_without_an_owner_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "on")

    warning = owner_warning(_config(tmp_path))

    assert warning is not None
    assert "owner_user_id" in warning and "IMAGEN_OWNER_USER_ID" in warning


def test_an_owner_from_config_or_environment_silences_the_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "on")
    assert owner_warning(_config(tmp_path, f"owner_user_id: {OWNER}\n")) is None

    monkeypatch.setenv("IMAGEN_OWNER_USER_ID", OWNER)
    assert owner_warning(_config(tmp_path)) is None


def test_auto_warns_only_when_it_resolves_to_the_cloud(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert owner_warning(_config(tmp_path)) is None

    _credentials(monkeypatch)
    assert owner_warning(_config(tmp_path)) is not None


def test_off_never_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _credentials(monkeypatch)
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "on")

    assert owner_warning(_config(tmp_path), no_cloud=True) is None
    monkeypatch.setenv("IMAGEN_CLOUD_SYNC", "off")
    assert owner_warning(_config(tmp_path)) is None
