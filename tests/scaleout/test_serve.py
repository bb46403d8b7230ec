"""Replicas of `glimpse serve` on Ray Serve, on a real local Ray cluster: two tiny-vl replicas answer the
real `openai` client (streaming included) through Serve's proxy, keep answering while one of them is
killed, and Serve brings the killed one back."""

from __future__ import annotations

import time

import openai
import pytest

from glimpse.cli import build_parser
from glimpse.server.config import serve_configs
from tests.server.server_process import free_port

KEY = "ray-secret"


def replicas(serve, app: str, deployment: str) -> dict[str, int]:
    status = serve.status().applications[app].deployments[deployment]
    return dict(status.replica_states)


def ask(client: openai.OpenAI, text: str, stream: bool = False) -> str:
    messages = [{"role": "user", "content": text}]
    if not stream:
        out = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=6, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1
        return text_of(out.choices[0].message)
    chunks = list(
        client.chat.completions.create(
            model="tiny-vl", messages=messages, max_tokens=6, temperature=0, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    return "".join(d.content or "" for d in deltas) + "|" + "".join(reasoning(d) for d in deltas)


def text_of(message) -> str:
    return (message.content or "") + "|" + reasoning(message)


def reasoning(message) -> str:
    """The tiny model's random text may open a think block: its reasoning counts as what it wrote."""
    return getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None) or ""


def test_app_builder_reads_a_serve_config(ray_cluster):
    from glimpse.scaleout.serve import app_builder

    app = app_builder({"serve_args": "tiny-vl --max-model-len 512 --api-key k", "replicas": 3,
                       "health_check_period_s": 2})  # fmt: skip
    assert app is not None
    with pytest.raises(ValueError, match="unknown application args"):
        app_builder({"serve_args": "tiny-vl", "replica": 3})
    with pytest.raises(ValueError, match="serve_args"):
        app_builder({"serve_args": "tiny-vl --no-such-flag"})


def test_two_replicas_answer_openai_and_survive_a_killed_replica(ray_cluster):
    ray = ray_cluster
    from ray import serve

    from glimpse.scaleout.serve import APP_NAME, ReplicaOptions, build_application

    port = free_port()
    args = build_parser().parse_args(["serve", "tiny-vl", "--api-key", KEY, "--max-model-len", "1024"])
    options = ReplicaOptions(
        replicas=2, cpus_per_replica=0.5, health_check_period_s=2, health_check_timeout_s=30
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_application(*serve_configs(args), options), name=APP_NAME, route_prefix="/")
        assert replicas(serve, APP_NAME, options.name) == {"RUNNING": 2}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-vl"]
        greedy = ask(client, "Hello")
        assert isinstance(greedy, str)
        assert ask(client, "Hello", stream=True) == greedy  # both replicas hold the same weights
        with pytest.raises(openai.AuthenticationError):  # the app's own API key check, through the proxy
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0
            ).models.list()

        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{options.name}#")]  # fmt: skip
        assert len(names) == 2
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        for k in range(6):  # right after the kill: every request is answered, by the replica left
            assert ask(client, "Hello", stream=k % 2 == 1) == greedy

        deadline = time.monotonic() + 120
        while replicas(serve, APP_NAME, options.name) != {"RUNNING": 2}:  # Serve replaces the dead one
            assert time.monotonic() < deadline, replicas(serve, APP_NAME, options.name)
            time.sleep(1)
        assert ask(client, "Hello") == greedy
    finally:
        serve.shutdown()


def test_the_health_check_fails_once_the_engine_stops():
    """What each replica's `check_health` asks (Serve replaces a replica whose check raises)."""
    from glimpse.engine.async_llm import AsyncLLM, EngineDeadError
    from glimpse.engine.config import EngineConfig

    llm = AsyncLLM.from_config(EngineConfig.from_kwargs("tiny", max_model_len=256, max_num_seqs=2))
    llm.check_health()
    llm.shutdown()
    with pytest.raises(EngineDeadError):
        llm.check_health()
