"""Settings: environment, TOML file, precedence and messages that name the setting."""

import pytest

from service.settings import SettingsError, load_settings, require_models


@pytest.fixture(autouse=True)
def no_vibe_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("VIBE_"):
            monkeypatch.delenv(name)


def test_defaults_have_no_secret_and_sane_bounds():
    settings = load_settings()
    assert settings.model_path is None
    assert 1 <= settings.default_max_new_tokens <= settings.max_new_tokens_limit
    assert settings.request_deadline_s == 60.0


def test_environment_overrides_toml(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text('queue_size = 5\nmodel_name = "from-toml"\nrequest_deadline_s = 12.5\n')
    monkeypatch.setenv("VIBE_CONFIG", str(config))
    monkeypatch.setenv("VIBE_QUEUE_SIZE", "9")
    settings = load_settings()
    assert (settings.queue_size, settings.model_name, settings.request_deadline_s) == (9, "from-toml", 12.5)


@pytest.mark.parametrize("name,value,fragment", [
    ("VIBE_QUEUE_SIZE", "abc", "valid integer"),
    ("VIBE_QUEUE_SIZE", "0", "greater than or equal to 1"),
    ("VIBE_DTYPE", "float16", "float32"),
    ("VIBE_REQUEST_DEADLINE_S", "-1", "greater than 0"),
    ("VIBE_PREFIX_CACHE_SCOPE", "everyone", "'model' or 'user'"),
    ("VIBE_PREFIX_CACHE_BYTES", "-1", "greater than or equal to 0"),
    ("VIBE_PREFILL_STEP_TOKENS", "0", "greater than or equal to 1"),
    ("VIBE_PREFILL_STEP_TOKENS", "65537", "less than or equal to 65536"),
    ("VIBE_TOP_P", "1", "unknown setting"),
    ("VIBE_MODLE_PATH", "/srv/model", "unknown setting"),
    ("VIBE_CONSOLE_URL", "api.example.org", "should match pattern"),
    ("VIBE_CONSOLE_LINK_TTL", "10", "should match pattern"),
    ("VIBE_CONSOLE_LINK_TTL", "0s", "between 1 minute and 24 hours"),
    ("VIBE_CONSOLE_SESSION_LIFETIME", "30d", "between 1 minute and 168 hours"),
    ("VIBE_CONSOLE_OIDC_ADMINS", "alice", "valid JSON"),
    ("VIBE_ALERT_TARGETS", '["hooks.example.org/s3cret"]', "target 1 is not an Apprise URL"),
    ("VIBE_ALERT_THRESHOLDS", "[80, 80]", "distinct percentages"),
    ("VIBE_ALERT_THRESHOLDS", "[0]", "distinct percentages between 1 and 100"),
    ("VIBE_ALERT_THRESHOLDS", "[150]", "distinct percentages between 1 and 100"),
])
def test_invalid_environment_names_the_setting(monkeypatch, name, value, fragment):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert name in str(err.value) and fragment in str(err.value)


def test_alert_settings_are_read_sorted_and_a_bad_target_is_never_quoted(monkeypatch):
    monkeypatch.setenv("VIBE_ALERT_TARGETS", '["json://hooks.example.org/a?token=x", "mailtos://u:p@example.org"]')
    monkeypatch.setenv("VIBE_ALERT_THRESHOLDS", "[100, 50, 80]")
    settings = load_settings()
    assert len(settings.alert_targets) == 2 and settings.alert_thresholds == [50, 80, 100]
    monkeypatch.setenv("VIBE_ALERT_TARGETS", '["json://ok/x", "not a url s3cret"]')
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "target 2" in str(err.value) and "s3cret" not in str(err.value)


def test_cross_field_check(monkeypatch):
    monkeypatch.setenv("VIBE_DEFAULT_MAX_NEW_TOKENS", "4096")
    with pytest.raises(SettingsError, match="VIBE_DEFAULT_MAX_NEW_TOKENS|max_new_tokens_limit"):
        load_settings()


def test_a_console_provider_needs_its_client(monkeypatch):
    monkeypatch.setenv("VIBE_CONSOLE_OIDC_ISSUER", "https://login.example.org")
    monkeypatch.setenv("VIBE_CONSOLE_OIDC_CLIENT_ID", "console")
    with pytest.raises(SettingsError, match="console_oidc_client_secret"):
        load_settings()
    monkeypatch.setenv("VIBE_CONSOLE_OIDC_CLIENT_SECRET", "s3cret")
    with pytest.raises(SettingsError, match="console_url"):
        load_settings()
    monkeypatch.setenv("VIBE_CONSOLE_URL", "https://api.example.org")
    assert load_settings().console_oidc_issuer == "https://login.example.org"


@pytest.mark.parametrize("content,fragment", [
    ("bogus = 1\n", "VIBE_BOGUS: unknown setting"),
    ("queue_size = 'many'\n", "VIBE_QUEUE_SIZE"),
    ("queue_size = \n", "VIBE_CONFIG"),
])
def test_bad_toml_names_the_setting_or_file(tmp_path, monkeypatch, content, fragment):
    config = tmp_path / "config.toml"
    config.write_text(content)
    monkeypatch.setenv("VIBE_CONFIG", str(config))
    with pytest.raises(SettingsError, match=fragment):
        load_settings()


def test_missing_config_file(monkeypatch, tmp_path):
    monkeypatch.setenv("VIBE_CONFIG", str(tmp_path / "absent.toml"))
    with pytest.raises(SettingsError, match="VIBE_CONFIG"):
        load_settings()


def test_model_path_must_be_a_model_folder(tmp_path, tiny_model):
    with pytest.raises(SettingsError, match="VIBE_MODEL_PATH: not set"):
        require_models(load_settings())
    with pytest.raises(SettingsError, match="no config.json"):
        require_models(load_settings(model_path=tmp_path))
    [spec] = require_models(load_settings(model_path=tiny_model, model_name="m", dtype="bfloat16"))
    assert (spec.name, spec.path, spec.dtype, spec.quantization) == ("m", tiny_model, "bfloat16", "none")
