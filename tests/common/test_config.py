import pytest

from services.common.config import (
    CommonConfig,
    ConfigError,
    ModelConfig,
    build,
    load_yaml,
    parse_override,
    set_dotted,
)


def test_defaults_are_valid():
    cfg = build(CommonConfig, {}, "defaults")
    assert cfg.redis.url == "" and cfg.grpc.max_message_bytes == 64 * 1024 * 1024


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="redis.urll"):
        build(CommonConfig, {"redis": {"urll": "redis://x"}}, "test")


def test_bad_values_name_the_field_and_the_fix():
    with pytest.raises(ConfigError) as err:
        build(CommonConfig, {"redis": {"url": "http://x"}, "grpc": {"max_message_bytes": 10}}, "test.yaml")
    text = str(err.value)
    assert "redis.url" in text and "redis://" in text
    assert "grpc.max_message_bytes" in text and "test.yaml" in text


def test_model_config_bounds():
    with pytest.raises(ConfigError, match="max_tiles_per_image"):
        build(ModelConfig, {"name": "m", "path": "/x", "max_tiles_per_image": 41}, "flags")
    with pytest.raises(ConfigError, match="dtype"):
        build(ModelConfig, {"name": "m", "path": "/x", "dtype": "int4"}, "flags")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("redis:\n  url: redis://127.0.0.1:6379/0\n")
    data = load_yaml(p)
    set_dotted(data, *parse_override("cache.ttl_s=60"))
    cfg = build(CommonConfig, data, str(p))
    assert cfg.cache.ttl_s == 60 and cfg.redis.url.endswith("/0")
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "bad.yaml")


def test_dotted_override_into_lists():
    data = {"models": [{"name": "a"}]}
    set_dotted(data, "models.0.dtype", "bfloat16")
    assert data["models"][0]["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="index"):
        set_dotted(data, "models.3.dtype", "x")
    with pytest.raises(ConfigError, match="not a mapping"):
        set_dotted({"a": 1}, "a.b", 2)
