"""Request parsing, validation and SamplingParams mapping; response shapes as OpenAI clients read them."""

from __future__ import annotations

import json
import math

import pytest

from glimpse.errors import InvalidRequestError, LimitExceededError
from glimpse.outputs import Logprob
from glimpse.server.logprobs import chat_logprobs, completion_logprobs
from glimpse.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    FilePart,
    ImageURLPart,
    InputFilePart,
    ModelCard,
    ModelList,
    RequestSize,
    SystemMessage,
    TextPart,
    ToolMessage,
    Usage,
    VideoURLPart,
    parse_request,
)
from glimpse.server.request_params import to_sampling_params
from glimpse.server.tool_parser import parse_tool_calls

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, {"model": "glimpse", "messages": USER, **fields})


def completion(**fields) -> CompletionRequest:
    return parse_request(CompletionRequest, {"model": "glimpse", "prompt": "Once", **fields})


def bad(fn, *args, **fields) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        fn(*args, **fields)
    assert info.value.status == 400
    return info.value


# ---------------------------------------------------------------- realistic requests

# What openai-python 1.x sends for client.chat.completions.create(model=..., messages=[...], tools=[...],
# stream=True, stream_options={"include_usage": True}, max_completion_tokens=512, temperature=0.6, top_p=0.95,
# extra_body={...}): the given params as JSON, extra_body merged at the top level.
MULTIMODAL_CHAT = json.dumps(
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. /think"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare these."},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"},
                    },
                    {"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}},
                    {
                        "type": "file",
                        "file": {
                            "file_data": "data:application/pdf;base64,JVBERi0=",
                            "filename": "report.pdf",
                        },
                    },
                    {"type": "file", "file": {"file_url": "https://example.com/a.pdf"}},
                    {
                        "type": "input_file",
                        "file_data": "data:application/pdf;base64,JVBERi0=",
                        "filename": "b.pdf",
                    },
                    {"type": "input_file", "file_url": "file:///data/c.pdf"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temp_c": 21}'},
        ],
        "model": "nvidia/Nemotron-Nano-12B-v2-VL",
        "max_completion_tokens": 512,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.6,
        "tool_choice": "auto",
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                        "additionalProperties": False,
                    },
                    "strict": True,
                },
            }
        ],
        "top_p": 0.95,
        "top_k": 20,
        "chat_template_kwargs": {"enable_thinking": True},
        "mm_processor_kwargs": {"max_num_tiles": 6},
        "media_io_kwargs": {"video": {"fps": 2, "num_frames": 64}},
        "video_pruning_rate": 0.75,
        "some_future_openai_field": {"ignored": True},
    }
)


def test_multimodal_chat_request_as_the_client_sends_it():
    req = parse_request(ChatCompletionRequest, MULTIMODAL_CHAT.encode())
    assert isinstance(req.messages[0], SystemMessage)
    parts = req.messages[1].content
    assert [type(p) for p in parts] == [
        TextPart,
        ImageURLPart,
        VideoURLPart,
        FilePart,
        FilePart,
        InputFilePart,
        InputFilePart,
    ]
    assert parts[1].image_url.detail == "high"
    assert parts[3].file.filename == "report.pdf" and parts[4].file.file_url.endswith("a.pdf")
    assert parts[6].file_url == "file:///data/c.pdf"
    assert req.messages[2].tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert isinstance(req.messages[3], ToolMessage) and req.messages[3].tool_call_id == "call_abc123"
    assert req.tools_enabled and req.include_usage
    assert req.chat_template_kwargs == {"enable_thinking": True}
    assert req.media_io_kwargs == {"video": {"fps": 2, "num_frames": 64}}
    assert req.video_pruning_rate == 0.75
    sp = to_sampling_params(req, default_max_tokens=4000)
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k) == (512, 0.6, 0.95, 20)
    # Dumping gives back OpenAI-style message dicts for the chat template.
    dumped = req.model_dump(mode="json", exclude_none=True, by_alias=True)["messages"]
    assert dumped[1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"},
    }


def test_structured_output_request_as_beta_parse_sends_it():
    # client.beta.chat.completions.parse(response_format=PydanticModel) sends a strict json_schema.
    schema = {
        "properties": {"answer": {"title": "Answer", "type": "string"}},
        "required": ["answer"],
        "title": "Reply",
        "type": "object",
        "additionalProperties": False,
    }
    req = chat(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "Reply", "schema": schema, "strict": True},
        }
    )
    assert to_sampling_params(req).json_schema == schema
    assert req.response_format.model_dump(by_alias=True)["json_schema"]["schema"] == schema


def test_developer_role_and_text_parts_in_system():
    req = chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}, *USER])
    assert req.messages[0].role == "developer"


def test_image_url_as_plain_string_is_accepted():
    req = chat(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]}]
    )
    assert req.messages[0].content[0].image_url.url == "https://x/y.png"


def test_assistant_arguments_given_as_object_become_a_string():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    req = chat(messages=[*USER, {"role": "assistant", "tool_calls": calls}])
    assert json.loads(req.messages[1].tool_calls[0].function.arguments) == {"a": 1}


def test_unknown_fields_are_ignored():
    req = chat(store=True, metadata={"a": "b"}, reasoning_effort="low", service_tier="auto")
    assert not hasattr(req, "store")
    # ... but named, so the server can warn about them.
    assert set(req.unknown_fields) == {"store", "metadata", "reasoning_effort", "service_tier"}
    assert "store" not in req.model_dump() and chat().unknown_fields == {}


# ---------------------------------------------------------------- to_sampling_params


def test_defaults_when_nothing_is_given():
    sp = to_sampling_params(chat())
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.logprobs) == (
        1,
        1.0,
        1.0,
        0,
        None,
        None,
    )
    assert sp.stop == [] and sp.json_schema is None and sp.regex is None and sp.skip_special_tokens


def test_max_completion_tokens_is_an_alias_of_max_tokens():
    assert to_sampling_params(chat(max_tokens=30)).max_tokens == 30
    assert to_sampling_params(chat(max_completion_tokens=40)).max_tokens == 40
    assert to_sampling_params(chat(max_tokens=30, max_completion_tokens=40)).max_tokens == 40


def test_max_tokens_checked_against_room_in_context_and_default_capped():
    assert to_sampling_params(chat(), default_max_tokens=100).max_tokens == 100
    assert to_sampling_params(chat(max_tokens=50), default_max_tokens=100).max_tokens == 50
    assert to_sampling_params(chat(max_tokens=100), default_max_tokens=100).max_tokens == 100
    assert to_sampling_params(chat(), 100, defaults={"max_tokens": 64}).max_tokens == 64
    # As vLLM: a length the client asked for that does not fit is a 400 naming the field and the context.
    err = bad(to_sampling_params, chat(max_tokens=500), default_max_tokens=100, max_model_len=1000)
    assert err.param == "max_tokens" and "500" in err.message and "1000" in err.message
    err = bad(to_sampling_params, chat(max_completion_tokens=101), default_max_tokens=100)
    assert err.param == "max_completion_tokens"
    assert bad(to_sampling_params, completion(max_tokens=17), default_max_tokens=16).param == "max_tokens"
    # Completions' default of 16 was not asked for: it is capped.
    assert to_sampling_params(completion(), default_max_tokens=5).max_tokens == 5
    err = bad(to_sampling_params, chat(), 0)
    assert err.param == "messages"
    assert bad(to_sampling_params, completion(), 0).param == "prompt"


def test_server_defaults_fill_only_missing_fields():
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1, "unrelated": 1}
    sp = to_sampling_params(chat(temperature=0.0), defaults=defaults)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.repetition_penalty) == (0.0, 0.95, 20, 1.1)


def test_sampling_fields_map_one_to_one():
    sp = to_sampling_params(
        chat(
            n=3,
            temperature=0,  # greedy with n > 1 is allowed
            top_p=0.5,
            top_k=-1,
            min_p=0.1,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            repetition_penalty=1.2,
            seed=-7,
            stop="END",
            stop_token_ids=[2, 11],
            ignore_eos=True,
            min_tokens=3,
            max_tokens=9,
            skip_special_tokens=False,
        )
    )
    assert (sp.n, sp.temperature, sp.greedy, sp.top_p, sp.top_k, sp.min_p) == (3, 0.0, True, 0.5, 0, 0.1)
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty, sp.seed) == (0.5, -0.5, 1.2, -7)
    assert (sp.stop, sp.stop_token_ids, sp.ignore_eos, sp.min_tokens, sp.max_tokens) == (
        ["END"],
        [2, 11],
        True,
        3,
        9,
    )
    assert sp.skip_special_tokens is False


def test_chat_logprobs_map_to_top_k():
    assert to_sampling_params(chat(logprobs=True)).logprobs == 0
    assert to_sampling_params(chat(logprobs=True, top_logprobs=5)).logprobs == 5
    assert to_sampling_params(chat(logprobs=False)).logprobs is None
    assert to_sampling_params(chat(top_logprobs=0)).logprobs is None
    assert bad(chat, top_logprobs=3).param == "top_logprobs"
    assert bad(chat, logprobs=False, top_logprobs=3).param == "top_logprobs"


@pytest.mark.parametrize(
    ("fields", "schema", "regex"),
    [
        ({"response_format": {"type": "text"}}, None, None),
        ({"response_format": {"type": "json_object"}}, {"type": "object"}, None),
        ({"structured_outputs": {"regex": "[0-9]+"}}, None, "[0-9]+"),
        ({"structured_outputs": {"json": {"type": "integer"}}}, {"type": "integer"}, None),
        ({"structured_outputs": {"json": '{"type": "string"}'}}, {"type": "string"}, None),
        ({"structured_outputs": {"choice": ["yes", "no", "a.b|c"]}}, None, r"(yes|no|a\.b\|c)"),
        ({"structured_outputs": {"json_object": True}}, {"type": "object"}, None),
        ({"guided_regex": "a+"}, None, "a+"),
        ({"guided_json": {"type": "array"}}, {"type": "array"}, None),
        ({"guided_choice": ["x"]}, None, "(x)"),
    ],
)
def test_constrained_decoding_mapping(fields, schema, regex):
    sp = to_sampling_params(chat(**fields))
    assert (sp.json_schema, sp.regex) == (schema, regex)
    assert (
        to_sampling_params(completion(**fields)).json_schema,
        to_sampling_params(completion(**fields)).regex,
    ) == (
        schema,
        regex,
    )


def test_completion_mapping():
    req = completion(logprobs=3, max_tokens=None, echo=False)
    assert to_sampling_params(req, 200).max_tokens == 200
    assert to_sampling_params(completion()).max_tokens == 16  # OpenAI's completions default
    assert to_sampling_params(completion(logprobs=3), default_max_tokens=5).logprobs == 3
    assert to_sampling_params(completion(logprobs=3), default_max_tokens=5).max_tokens == 5


def test_echo_with_logprobs_and_max_tokens_zero():
    """[G8] echo with logprobs is accepted (the prompt's logprobs are computed); max_tokens 0 is allowed
    with echo only, and the engine then draws one token that is not returned."""
    req = completion(echo=True, logprobs=2, max_tokens=0)
    assert req.echo_only and to_sampling_params(req, 200).max_tokens == 1
    assert not completion(echo=True, logprobs=2).echo_only
    assert bad(completion, max_tokens=0).param == "max_tokens"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("text", ["text"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
        ("", [""]),
    ],
)
def test_completion_prompt_forms(prompt, expected):
    assert completion(prompt=prompt).prompts() == expected


def test_request_size_of_a_validated_request():
    assert RequestSize.of(completion(prompt=["ab", "abcd", "a"], n=2)) == RequestSize("prompt", 3, 2, 4, 0)
    assert RequestSize.of(completion(prompt=[[1], [1, 2, 3]])) == RequestSize("prompt", 2, 1, 0, 3)
    assert RequestSize.of(completion(prompt=[1, 2])) == RequestSize("prompt", 1, 1, 0, 2)
    text = [{"type": "text", "text": "abc"}, {"type": "image_url", "image_url": "u"}]
    messages = [{"role": "system", "content": "12345"}, {"role": "user", "content": text}]
    assert RequestSize.of(chat(messages=messages, n=3)) == RequestSize("messages", 1, 3, 8, 0)


def test_request_size_glanced_from_the_start_of_a_large_body():
    """Only the first 256 KB are parsed: the numbers are what they show (lower bounds)."""
    batch = json.dumps({"prompt": [list(range(10))] * 2_000_000, "n": 2}).encode()  # 66 MB
    size = RequestSize.glance(batch, chat=False)
    assert size.partial and size.param == "prompt" and 4_096 < size.prompts < 20_000 and size.n == 1
    text = json.dumps({"n": 2, "prompt": "x" * 5_000_000}).encode()
    assert RequestSize.glance(text, chat=False).text_chars > 200_000
    assert RequestSize.glance(json.dumps({"prompt": [7] * 2_000_000}).encode(), chat=False).token_ids > 50_000
    parts = [{"type": "text", "text": "y" * 150_000}, {"type": "image_url", "image_url": "u"}]
    body = json.dumps({"messages": [{"role": "user", "content": "z" * 75_000}, {"role": "user", "content": parts},
                                    {"role": "assistant", "content": "w" * 225_000}]}).encode()  # fmt: skip
    size = RequestSize.glance(body, chat=True)
    assert size.param == "messages" and size.n == 1 and 250_000 < size.text_chars < 450_000
    assert RequestSize.glance(b"[1, 2, 3" + b" " * 2_000_000, chat=False) is None
    assert RequestSize.glance(b"not json at all", chat=True) is None
    assert RequestSize.glance(json.dumps({"prompt": [], "x": "y" * 2_000_000}).encode(), chat=False) is None


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),  # a string is not a number
        ({"max_tokens": True}, "max_tokens"),  # nor is a boolean
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"seed": 2**64}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stop_token_ids": [-1]}, "stop_token_ids.0"),
        ({"video_pruning_rate": 1.0}, "video_pruning_rate"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"presence_penalty": -float("inf")}, "presence_penalty"),
        ({"video_pruning_rate": float("nan")}, "video_pruning_rate"),
        ({"structured_outputs": {"json": {"maximum": float("inf")}}}, "structured_outputs.json"),
        ({"chat_template_kwargs": {"x": [1, float("nan")]}}, "chat_template_kwargs"),
        ({"media_io_kwargs": {"video": {"fps": float("inf")}}}, "media_io_kwargs.video"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"structured_outputs": {"json": "[1]"}}, "structured_outputs.json"),
        ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "structured_outputs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages.0.content.0"),
        (
            {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": "u"}]}]},
            "messages.0.content.0",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]},
            "messages.0.content.0.image_url.url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "u", "detail": "max"}}],
                    }
                ]
            },
            "messages.0.content.0.image_url.detail",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}]},
            "messages.0.content.0.file",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "file", "file": {"file_data": "d", "file_url": "u"}}],
                    }
                ]
            },
            "messages.0.content.0.file",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_file", "filename": "a.pdf"}]}]},
            "messages.0.content.0",
        ),
    ],
)
def test_invalid_chat_requests(fields, param):
    err = bad(chat, **fields)
    assert err.param == param, err.message
    assert err.message


def test_error_messages_say_what_is_allowed():
    assert "greater than or equal to 0" in bad(chat, temperature=-1).message
    assert "role must be one of" in bad(chat, messages=[{"role": "robot", "content": "x"}]).message
    assert (
        "file_id is not supported"
        in bad(
            chat, messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]
        ).message
    )
    # The branch the client meant is reported, not the noise of `content` not being a string.
    msg = bad(
        chat, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]
    ).message
    assert "valid string" in msg and "messages.0.content:" not in msg


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt.0"),
        ({"prompt": [-1]}, "prompt.0"),
        ({"prompt": None}, "prompt"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_invalid_completion_requests(fields, param):
    assert bad(completion, **fields).param == param


def test_logprobs_over_openais_20_parse():
    """The schema has no upper bound on logprobs: the server's --max-logprobs is the cap (vLLM's way)."""
    assert chat(logprobs=True, top_logprobs=50).top_logprobs == 50
    assert completion(logprobs=50).logprobs == 50


def test_malformed_bodies():
    assert "not valid JSON" in bad(parse_request, ChatCompletionRequest, b'{"messages": [').message
    assert "JSON object" in bad(parse_request, ChatCompletionRequest, b"[1, 2]").message
    assert bad(parse_request, ChatCompletionRequest, b"{}").param == "messages"


# ---------------------------------------------------------------- responses


def test_chat_response_shape():
    content, calls = parse_tool_calls('<TOOLCALL>[{"name": "f", "arguments": {"x": 1}}]</TOOLCALL>')
    resp = ChatCompletionResponse(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[
            ChatCompletionChoice(
                index=0,
                message=ChatCompletionMessage(
                    content=content, reasoning_content="hmm", tool_calls=[c.to_openai() for c in calls]
                ),
                finish_reason="tool_calls",
            ),
            ChatCompletionChoice(index=1, message=ChatCompletionMessage(content="hi"), finish_reason="stop"),
        ],
        usage=Usage.make(10, 5, cached_tokens=4, video_tokens={"total": 512, "kept": 128}),
    )
    assert resp.model_dump() == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "reasoning_content": "hmm",
                    "tool_calls": [
                        {
                            "id": calls[0].id,
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"x": 1}'},
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
                "stop_reason": None,
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": "hi", "reasoning_content": None},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            },
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4},
            "video_tokens": {"total": 512, "kept": 128},
        },
    }
    assert json.loads(resp.model_dump_json()) == resp.model_dump()
    assert Usage.make(1, 2).model_dump() == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


def test_chunk_shapes():
    first = ChatCompletionChunk(
        id="c",
        created=1,
        model="m",
        choices=[ChatCompletionChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
    )
    assert first.model_dump() == {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    reasoning = ChatCompletionChunkChoice(index=0, delta=DeltaMessage(reasoning_content="hm"))
    assert reasoning.model_dump()["delta"] == {"reasoning_content": "hm"}
    usage_only = ChatCompletionChunk(id="c", created=1, model="m", usage=Usage.make(1, 1))
    assert usage_only.model_dump()["choices"] == [] and usage_only.model_dump()["usage"]["total_tokens"] == 2
    chunk = CompletionChunk(id="x", created=1, model="m", choices=[CompletionChoice(index=0, text="a")])
    assert chunk.model_dump() == {
        "id": "x",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None, "stop_reason": None}],
    }


def test_models_and_errors():
    listing = ModelList(data=[ModelCard(id="glimpse", created=1, max_model_len=8192)]).model_dump()
    assert listing == {
        "object": "list",
        "data": [
            {"id": "glimpse", "object": "model", "created": 1, "owned_by": "glimpse", "max_model_len": 8192}
        ],
    }
    body = ErrorResponse.from_error(InvalidRequestError("bad temperature", param="temperature")).model_dump()
    assert body == {
        "error": {
            "message": "bad temperature",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": 400,
        }
    }
    assert ErrorResponse.from_error(LimitExceededError("too big")).model_dump()["error"]["code"] == 413


def test_chat_logprobs_shape():
    steps = [
        {5: Logprob(-0.1, 1, "Hi"), 6: Logprob(-2.5, 2, "Hey"), 7: Logprob(-3.0, 3, "Yo")},
        {9: Logprob(-float("inf"), 40, "é"), 1: Logprob(-0.01, 1, "!")},  # sampled token outside the top k
    ]
    out = chat_logprobs([5, 9], steps, top_logprobs=2).model_dump()
    assert out["content"][0] == {
        "token": "Hi",
        "logprob": -0.1,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.1, "bytes": [72, 105]},
            {"token": "Hey", "logprob": -2.5, "bytes": [72, 101, 121]},
        ],
    }
    second = out["content"][1]
    assert second["token"] == "é" and second["bytes"] == [195, 169] and second["logprob"] == -9999.0
    assert [t["token"] for t in second["top_logprobs"]] == ["!", "é"]
    assert chat_logprobs([5], steps[:1], top_logprobs=0).model_dump()["content"][0]["top_logprobs"] == []


def test_completion_logprobs_shape():
    steps = [{5: Logprob(-0.5, 1, "Once"), 6: Logprob(-1.0, 2, "Twice")}, {7: Logprob(-0.2, 1, " upon")}]
    out = completion_logprobs([5, 7], steps, top_logprobs=1, text_offset=3).model_dump()
    assert out == {
        "text_offset": [3, 7],
        "token_logprobs": [-0.5, -0.2],
        "tokens": ["Once", " upon"],
        "top_logprobs": [{"Once": -0.5}, {" upon": -0.2}],
    }
    none_top = completion_logprobs([5], steps[:1], top_logprobs=0).model_dump()
    assert none_top["top_logprobs"] == [None]
    assert all(math.isfinite(x) for x in none_top["token_logprobs"])


# ---------------------------------------------------------------- the real openai client


def test_real_openai_client_round_trip():
    """The official client's own serialisation parses, and our responses parse in its types."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        if request.url.path.endswith("/chat/completions"):
            req = parse_request(ChatCompletionRequest, request.content)
            if req.stream:
                chunks = [
                    ChatCompletionChunk(
                        id="c",
                        model="m",
                        choices=[
                            ChatCompletionChunkChoice(
                                index=0, delta=DeltaMessage(role="assistant", content="")
                            )
                        ],
                    ),
                    ChatCompletionChunk(
                        id="c",
                        model="m",
                        choices=[
                            ChatCompletionChunkChoice(index=0, delta=DeltaMessage(reasoning_content="hm"))
                        ],
                    ),
                    ChatCompletionChunk(
                        id="c",
                        model="m",
                        choices=[
                            ChatCompletionChunkChoice(
                                index=0, delta=DeltaMessage(content="Hi"), finish_reason="stop"
                            )
                        ],
                    ),
                    ChatCompletionChunk(id="c", model="m", usage=Usage.make(3, 2, cached_tokens=0)),
                ]
                sse = "".join(f"data: {c.model_dump_json()}\n\n" for c in chunks) + "data: [DONE]\n\n"
                return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})
            content, calls = parse_tool_calls(
                '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</TOOLCALL>'
            )
            resp = ChatCompletionResponse(
                model=req.model,
                choices=[
                    ChatCompletionChoice(
                        index=0,
                        message=ChatCompletionMessage(
                            content=content,
                            reasoning_content="think",
                            tool_calls=[c.to_openai() for c in calls],
                        ),
                        finish_reason="tool_calls",
                    )
                ],
                usage=Usage.make(7, 3, cached_tokens=0, video_tokens={"total": 10, "kept": 5}),
            )
            return httpx.Response(200, json=resp.model_dump())
        req = parse_request(CompletionRequest, request.content)
        resp = CompletionResponse(
            model=req.model,
            choices=[CompletionChoice(index=0, text=" upon", finish_reason="length")],
            usage=Usage.make(1, 1),
        )
        return httpx.Response(200, json=resp.model_dump())

    client = openai.OpenAI(
        base_url="http://glimpse.test/v1",
        api_key="k",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    out = client.chat.completions.create(
        model="glimpse",
        messages=[
            {"role": "system", "content": "/think"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {
                        "type": "file",
                        "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
                    },
                ],
            },
        ],
        tools=tools,
        tool_choice="auto",
        max_completion_tokens=64,
        temperature=0.2,
        logprobs=True,
        top_logprobs=2,
        stop=["\n\n"],
        seed=3,
        extra_body={
            "top_k": 5,
            "chat_template_kwargs": {"enable_thinking": False},
            "video_pruning_rate": 0.5,
        },
    )
    sent = parse_request(ChatCompletionRequest, seen[-1])
    sp = to_sampling_params(sent, default_max_tokens=1000)
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.logprobs, sp.stop, sp.seed) == (
        64,
        0.2,
        5,
        2,
        ["\n\n"],
        3,
    )
    assert sent.chat_template_kwargs == {"enable_thinking": False} and sent.tools_enabled
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Oslo"}
    assert choice.message.reasoning_content == "think"  # an extra field, kept by the client
    assert out.usage.prompt_tokens_details.cached_tokens == 0 and out.usage.total_tokens == 10

    stream = client.chat.completions.create(
        model="glimpse",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert seen[-1]["stream"] is True and seen[-1]["stream_options"] == {"include_usage": True}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hi"
    assert chunks[1].choices[0].delta.reasoning_content == "hm"
    assert chunks[-1].usage.completion_tokens == 2 and chunks[-1].choices == []

    done = client.completions.create(model="glimpse", prompt=[1, 2, 3], max_tokens=4, logprobs=2, n=2)
    sent = parse_request(CompletionRequest, seen[-1])
    assert sent.prompts() == [[1, 2, 3]]
    assert (to_sampling_params(sent).max_tokens, to_sampling_params(sent).logprobs, sent.n) == (4, 2, 2)
    assert done.choices[0].text == " upon" and done.object == "text_completion"


def test_sse_event_is_one_line_for_any_generated_text():
    """Generated text may hold U+2028, U+2029 or U+0085, which JSON leaves raw but line readers such as
    str.splitlines (httpx's aiter_lines) split at; the event must survive any such reader intact."""
    import json

    from glimpse.server.serving_completions import sse

    text = "a\u2028b\u2029c\x85d\u00e9\n\r\t\x1c"
    event = sse({"choices": [{"delta": {"content": text}}]})
    assert event.endswith("\n\n")
    lines = event[:-2].splitlines()
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["content"] == text
