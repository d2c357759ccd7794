import pytest

from runtime.settings import ConfigError, load_settings


def test_precedence_env_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("shards: 8\nbatch_size: 50\nkafka: {security.protocol: SSL}\n")
    s = load_settings({"TALLYFLOW_CONFIG": str(f), "TALLYFLOW_SHARDS": "16"})
    assert (s.engine.shards, s.kafka.batch_size, s.engine.window_seconds) == (16, 50, 60.0)
    assert s.kafka.librdkafka == {"security.protocol": "SSL"}


def test_kafka_settings_pass_through_and_user_wins():
    s = load_settings({"TALLYFLOW_KAFKA_SASL_MECHANISM": "PLAIN", "TALLYFLOW_KAFKA_LINGER_MS": "50"})
    cfg = s.kafka.config(**{"linger.ms": 5})
    assert cfg["sasl.mechanism"] == "PLAIN" and cfg["linger.ms"] == "50"


def test_secrets_are_masked_in_the_printed_configuration():
    s = load_settings({"TALLYFLOW_KAFKA_SASL_PASSWORD": "hunter2", "TALLYFLOW_KAFKA_SSL_KEY_PASSWORD": "x"})
    assert "hunter2" not in str(s.masked()) and s.masked()["kafka"]["sasl.password"] == "***"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"TALLYFLOW_SHARDS": "many"}, "TALLYFLOW_SHARDS"),
        ({"TALLYFLOW_WINDOW_SECONDS": "0"}, "TALLYFLOW_WINDOW_SECONDS"),
        ({"TALLYFLOW_GRACE_SECONDS": "1", "TALLYFLOW_ALLOWED_LATENESS_SECONDS": "5"}, "TALLYFLOW_GRACE_SECONDS"),
        ({"TALLYFLOW_START_FROM": "middle"}, "TALLYFLOW_START_FROM"),
        ({"TALLYFLOW_CONFIG": "/nonexistent.yaml"}, "TALLYFLOW_CONFIG"),
    ],
)
def test_bad_setting_names_the_variable(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_settings(env)


def test_recovery_is_assumed_unless_clearly_absent():
    from dataflows.rating import recovery_configured

    run = ["bytewax.run", "dataflows.rating:get_flow()"]
    assert not recovery_configured(run, {})
    assert recovery_configured([*run, "-r", "/data"], {})
    assert recovery_configured([*run, "--recovery-directory=/data"], {})
    assert recovery_configured(run, {"BYTEWAX_RECOVERY_DIRECTORY": "/data"})


def test_credentials_inside_urls_are_masked_and_may_come_from_files(tmp_path):
    redis = tmp_path / "redis_url"
    redis.write_text("redis://:s3cret@redis:6379/0\n")
    sasl = tmp_path / "sasl"
    sasl.write_text("hunter2\n")
    s = load_settings(
        {
            "TALLYFLOW_REDIS_URL_FILE": str(redis),
            "TALLYFLOW_KAFKA_SASL_PASSWORD_FILE": str(sasl),
            "TALLYFLOW_ERP_URL": "https://svc:pa55@erp.example.com/api",
        }
    )
    assert s.stores.redis_url == "redis://:s3cret@redis:6379/0" and s.kafka.librdkafka["sasl.password"] == "hunter2"
    shown = str(s.masked())
    assert "s3cret" not in shown and "pa55" not in shown and "hunter2" not in shown
    assert s.masked()["erp_url"] == "https://svc:***@erp.example.com/api"


def test_an_unknown_variable_is_warned_about_with_the_closest_name(capsys):
    load_settings({"TALLYFLOW_BROKER": "kafka:9092", "TALLYFLOW_MAX_DEPTHH": "3"})
    err = capsys.readouterr().err
    assert "TALLYFLOW_BROKER is not a setting" in err and "did you mean TALLYFLOW_BROKERS?" in err
    assert "did you mean TALLYFLOW_MAX_DEPTH?" in err


def test_input_limits_come_from_settings():
    s = load_settings({"TALLYFLOW_MAX_MESSAGE_BYTES": "4096", "TALLYFLOW_MAX_QUANTITY": "1000", "TALLYFLOW_MAX_FUTURE_SECONDS": "0"})
    lim = s.limits
    assert (lim.max_message_bytes, str(lim.max_quantity), lim.max_future_seconds) == (4096, "1000", 0.0)
