"""Configuration declared once: flat names route to sub-configs, values are checked where they are
declared, and every command's flags are generated from the dataclasses with their defaults."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from glimpse.cli import build_parser
from glimpse.engine.config import CacheConfig, EngineConfig, MediaConfig, SchedulerConfig
from glimpse.processing.media import MediaLimits
from glimpse.server.config import (
    SERVER_ENGINE_DEFAULTS,
    ServerConfig,
    configs_from_json,
    configs_to_json,
    serve_configs,
)
from glimpse.settings import flag_name, from_flat, leaf_fields, setting_names, to_flat

# API.md's `LLM(...)` arguments and their defaults.
LLM_DEFAULTS = dict(
    dtype="auto", device="auto", max_model_len=None, max_num_batched_tokens=8192, max_num_seqs=256,
    enable_prefix_caching=True, mamba_ssm_cache_dtype="float32", gpu_memory_utilization=0.9,
    cache_memory_bytes=None, video_pruning_rate=0.0, allowed_local_media_path=None,
    allow_private_media_urls=True, seed=0, tensor_parallel_size=1,
)  # fmt: skip

# Every engine flag the commands had before they were generated, with its default.
ENGINE_FLAGS = {
    "--dtype": "auto", "--device": "auto", "--max-model-len": None, "--max-num-seqs": 256,
    "--max-num-batched-tokens": 8192, "--mamba-ssm-cache-dtype": "float32", "--gpu-memory-utilization": 0.9,
    "--video-pruning-rate": 0.0, "--seed": 0, "--enforce-eager": False, "--async-scheduling": None,
    "--enable-prefix-caching": True, "--tensor-parallel-size": 1,
}  # fmt: skip
SERVE_FLAGS = {
    "--host": "127.0.0.1", "--port": 8000, "--served-model-name": None, "--api-key": None,
    "--uvicorn-log-level": "info", "--allowed-local-media-path": None, "--allow-private-media-urls": False,
    "--limit-mm-per-prompt": {"image": 16, "video": 2, "file": 4}, "--max-request-bytes": 268435456,
    "--max-image-pixels": 64000000, "--max-video-bytes": 2147483648, "--max-video-seconds": 21600,
    "--max-video-frames": 1024, "--max-pdf-pages": 32, "--media-fetch-timeout": 30,
}  # fmt: skip


def sub_parser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (subs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subs.choices[command]


def flag_defaults(command: str) -> dict[str, object]:
    return {
        option: action.default
        for action in sub_parser(command)._actions
        for option in action.option_strings
        if option.startswith("--") and not option.startswith("--no-")
    }


# ------------------------------------------------------------------------------------------- kwargs


def test_defaults_are_api_md():
    cfg = EngineConfig.from_kwargs("tiny")
    flat = cfg.to_kwargs()
    assert flat["model"] == "tiny"
    assert {k: flat[k] for k in LLM_DEFAULTS} == LLM_DEFAULTS


def test_flat_names_route_to_sub_configs():
    cfg = EngineConfig.from_kwargs(
        "tiny",
        block_size=32,
        max_num_seqs=8,
        video_pruning_rate=0.5,
        max_model_len=512,
        async_scheduling=False,
    )
    assert cfg.cache == CacheConfig(block_size=32)
    assert cfg.scheduler == SchedulerConfig(max_num_seqs=8, async_scheduling=False)
    assert cfg.media == MediaConfig(video_pruning_rate=0.5)
    assert cfg.max_model_len == 512
    assert EngineConfig.from_kwargs(**cfg.to_kwargs()) == cfg


def test_flat_names_are_unique():
    for cls in (EngineConfig, ServerConfig):
        names = setting_names(cls)
        assert len(names) == len(set(names)), cls
    assert not set(setting_names(EngineConfig)) & set(setting_names(ServerConfig))


def test_unknown_kwarg_is_a_type_error_with_a_suggestion():
    with pytest.raises(TypeError, match=r"unexpected setting 'max_num_seq'; did you mean 'max_num_seqs'\?"):
        EngineConfig.from_kwargs("tiny", max_num_seq=8)
    with pytest.raises(TypeError, match=r"unexpected setting 'colour'$"):
        EngineConfig.from_kwargs("tiny", colour="blue")
    with pytest.raises(TypeError, match="'max_num_seq'"):
        from glimpse import LLM

        LLM("tiny", max_num_seq=8)  # fails before any model is loaded


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dtype": "float8"}, "dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got 'float8'"),
        ({"mamba_ssm_cache_dtype": "float16"}, "mamba_ssm_cache_dtype must be one of 'float32', 'bfloat16'"),
        ({"video_pruning_rate": 1.0}, r"video_pruning_rate must be in \[0, 1\), got 1.0"),
        ({"video_pruning_rate": -0.1}, r"video_pruning_rate must be in \[0, 1\)"),
        ({"gpu_memory_utilization": 0}, r"gpu_memory_utilization must be in \(0, 1\], got 0"),
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \(0, 1\]"),
        ({"block_size": 0}, "block_size must be > 0, got 0"),
        ({"max_num_seqs": -1}, "max_num_seqs must be > 0"),
        ({"max_num_batched_tokens": "many"}, "max_num_batched_tokens must be > 0, got 'many'"),
        ({"max_model_len": 0}, "max_model_len must be > 0"),
        ({"cache_memory_bytes": 0}, "cache_memory_bytes must be > 0"),
        ({"encoder_cache_bytes": -5}, "encoder_cache_bytes must be > 0"),
        ({"device": "gpu7"}, "device must be 'auto' or a torch device"),
    ],
)
def test_validation_names_the_field_and_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.from_kwargs("tiny", **kwargs)


def test_media_limits_are_checked():
    with pytest.raises(ValueError, match="max_video_frames must be > 0, got 0"):
        MediaLimits(max_video_frames=0)
    with pytest.raises(ValueError, match="limit_mm_per_prompt must be a map from image, video, file"):
        MediaLimits(limit_mm_per_prompt={"audio": 1})
    with pytest.raises(ValueError, match="limit_mm_per_prompt"):
        MediaLimits(limit_mm_per_prompt={"image": -1})
    with pytest.raises(ValueError, match="port must be > 0"):
        ServerConfig(port=0)
    with pytest.raises(ValueError, match="uvicorn_log_level must be one of"):
        ServerConfig(uvicorn_log_level="loud")


def test_configs_are_frozen():
    cfg = EngineConfig.from_kwargs("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cache.block_size = 8  # type: ignore[misc]


def test_configs_travel_as_json():
    engine = EngineConfig.from_kwargs("tiny", max_num_seqs=4, allow_private_media_urls=False)
    server = from_flat(ServerConfig, port=1234, api_key=None, max_video_frames=8,
                       limit_mm_per_prompt={"image": 1, "video": 0, "file": 0})  # fmt: skip
    assert configs_from_json(configs_to_json(engine, server)) == (engine, server)
    assert to_flat(server)["max_video_frames"] == 8


# ------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_every_engine_setting_has_a_flag_with_its_default(command):
    flags = flag_defaults(command)
    for name in setting_names(EngineConfig):
        if name == "model":
            continue
        expected = SERVER_ENGINE_DEFAULTS.get(name) if command == "serve" else None
        default = to_flat(EngineConfig(model="x"))[name]
        assert flags[flag_name(name)] == (default if expected is None else expected), name


def test_every_server_and_media_limit_setting_has_a_flag_with_its_default(monkeypatch):
    monkeypatch.delenv("GLIMPSE_API_KEY", raising=False)
    flags = flag_defaults("serve")
    for name, value in to_flat(ServerConfig()).items():
        assert flags[flag_name(name)] == value, name


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_the_flags_of_before_keep_their_names_and_defaults(command, monkeypatch):
    monkeypatch.delenv("GLIMPSE_API_KEY", raising=False)
    flags = flag_defaults(command)
    expected = ENGINE_FLAGS | (SERVE_FLAGS if command == "serve" else {})
    assert {k: flags[k] for k in expected} == expected


def test_bench_device_and_dtype_come_from_the_engine_config():
    flags = flag_defaults("bench")
    assert flags["--device"] == "auto" and flags["--dtype"] == "auto"
    args = build_parser().parse_args(["bench", "--dtype", "bfloat16"])
    assert args.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--dtype", "float8"])


def test_flags_parse_into_the_configs():
    args = build_parser().parse_args([
        "serve", "tiny", "--max-num-seqs", "4", "--no-enable-prefix-caching", "--enforce-eager",
        "--allow-private-media-urls", "--max-video-frames", "8", "--port", "9000", "--block-size", "32",
        "--limit-mm-per-prompt", '{"image": 2}',
    ])  # fmt: skip
    engine, server = serve_configs(args)
    assert engine.model == "tiny" and engine.scheduler.max_num_seqs == 4 and engine.scheduler.enforce_eager
    assert not engine.cache.enable_prefix_caching and engine.cache.block_size == 32
    assert engine.media.allow_private_media_urls and server.port == 9000
    assert server.media_limits.max_video_frames == 8
    assert server.media_limits.limit_mm_per_prompt == {"image": 2, "video": 2, "file": 4}


@pytest.mark.parametrize(
    "flags",
    [
        ["--video-pruning-rate", "1"],
        ["--gpu-memory-utilization", "0"],
        ["--max-num-seqs", "0"],
        ["--max-num-seqs", "many"],
        ["--mamba-ssm-cache-dtype", "float16"],
        ["--max-pdf-pages", "0"],
        ["--limit-mm-per-prompt", '{"audio": 1}'],
        ["--limit-mm-per-prompt", "[1]"],
    ],
)
def test_bad_flag_values_are_usage_errors(flags, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "tiny", *flags])
    assert "error: argument" in capsys.readouterr().err


def test_every_flag_has_help():
    from glimpse.server.config import VllmOnlyFlags

    for cls in (EngineConfig, ServerConfig, VllmOnlyFlags):
        for _, _, f, _ in leaf_fields(cls):
            assert f.metadata.get("help"), f.name


# ------------------------------------------------------------------------------ [G8] vLLM's flags


def test_model_is_positional_or_a_flag():
    assert build_parser().parse_args(["serve", "--model", "tiny"]).model == "tiny"
    assert build_parser().parse_args(["generate", "tiny", "--prompt", "x"]).model == "tiny"
    for argv in (["serve"], ["serve", "a", "--model", "b"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)


def test_the_port_is_a_tcp_port(capsys):
    assert ServerConfig(port=65535).port == 65535
    with pytest.raises(ValueError, match="port must be > 0 and <= 65535, got 65536"):
        ServerConfig(port=65536)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "tiny", "--port", "99999"])
    assert "99999" in capsys.readouterr().err


def test_served_model_names():
    engine, server = serve_configs(
        build_parser().parse_args(["serve", "tiny", "--served-model-name", "a", "b"])
    )
    assert server.served_model_name == ["a", "b"] and server.model_names(engine.model) == ["a", "b"]
    assert ServerConfig(served_model_name="one").model_names("tiny") == ["one"]  # the Python API's form
    assert ServerConfig().model_names("tiny") == ["tiny"]
    for bad in ([], [""], "", ["a", 3]):
        with pytest.raises(ValueError, match="served_model_name"):
            ServerConfig(served_model_name=bad)


def test_cors_flags_are_json_lists(capsys):
    args = build_parser().parse_args(["serve", "tiny", "--allowed-origins", '["http://a.example"]',
                                      "--allowed-methods", '["GET", "POST"]'])  # fmt: skip
    _, server = serve_configs(args)
    assert server.allowed_origins == ["http://a.example"] and server.allowed_methods == ["GET", "POST"]
    assert server.allowed_headers == ["*"] and not server.allow_credentials
    assert ServerConfig().allowed_origins == []  # no cross-origin access unless asked for
    for bad in ("*", '{"a": 1}', "[1]"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "tiny", "--allowed-origins", bad])
        assert "JSON list of strings" in capsys.readouterr().err


def test_limit_mm_per_prompt_key_value_form():
    from glimpse.processing.media import parse_limit_mm_per_prompt

    assert parse_limit_mm_per_prompt("image=4,video=1") == {"image": 4, "video": 1, "file": 4}
    assert parse_limit_mm_per_prompt(" image = 2 ") == parse_limit_mm_per_prompt('{"image": 2}')
    for bad in ("image=x", "image=1=2", "image"):
        with pytest.raises(ValueError, match="KIND=N"):
            parse_limit_mm_per_prompt(bad)


def test_tls_key_needs_its_certificate():
    assert ServerConfig(ssl_certfile="c.pem").ssl_keyfile is None
    with pytest.raises(ValueError, match="ssl_keyfile needs ssl_certfile"):
        ServerConfig(ssl_keyfile="k.pem")


def test_new_settings_travel_as_json():
    engine = EngineConfig.from_kwargs("tiny", tokenizer="tiny", revision="v1", download_dir="/d",
                                      chat_template="{{ x }}", quantization="modelopt")  # fmt: skip
    server = from_flat(ServerConfig, served_model_name=["a", "b"], allowed_origins=["*"], max_logprobs=5,
                       ssl_certfile="c.pem", ssl_keyfile="k.pem")  # fmt: skip
    assert configs_from_json(configs_to_json(engine, server)) == (engine, server)
    with pytest.raises(ValueError, match="quantization must be one of 'modelopt', 'modelopt_fp4'"):
        EngineConfig.from_kwargs("tiny", quantization="awq")


def test_vllm_only_flags_are_accepted_and_noted():
    from glimpse.server.config import VllmOnlyFlags, vllm_only_notes

    args = build_parser().parse_args(["serve", "tiny", "--trust-remote-code", "--tool-call-parser", "hermes",
                                      "--no-enable-chunked-prefill"])  # fmt: skip
    notes = vllm_only_notes(args)
    assert [n.split()[0] for n in notes] == [
        "--trust-remote-code",
        "--tool-call-parser",
        "--enable-chunked-prefill",
    ]
    assert all("does nothing" in n and "error" not in n.lower() for n in notes)
    assert vllm_only_notes(build_parser().parse_args(["serve", "tiny"])) == []
    assert not set(setting_names(VllmOnlyFlags)) & (
        set(setting_names(EngineConfig)) | set(setting_names(ServerConfig))
    )


def test_chat_template_is_a_file_or_jinja(tmp_path):
    from glimpse.processing.chat import read_chat_template

    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert read_chat_template(str(tmp_path / "t.jinja")) == "{{ messages }}"
    assert read_chat_template("{% for m in messages %}{{ m }}{% endfor %}").startswith("{% for")
    with pytest.raises(ValueError, match="neither a readable file nor Jinja text"):
        read_chat_template(str(tmp_path / "typo.jinja"))


# ------------------------------------------------------------------- [G8] checks before the model loads


def test_a_busy_port_is_a_startup_error():
    import socket

    from glimpse.server.startup import StartupError, bind_socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            bind_socket("127.0.0.1", port)
    sock = bind_socket("127.0.0.1", 0)
    sock.close()


def test_unusable_tls_files_are_a_startup_error(tmp_path):
    from glimpse.server.startup import StartupError, check_tls

    check_tls(None, None)
    with pytest.raises(StartupError, match="--ssl-certfile .*absent.pem"):
        check_tls(str(tmp_path / "absent.pem"), None)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(StartupError, match="cannot serve HTTPS"):
        check_tls(str(tmp_path / "junk.pem"), None)
