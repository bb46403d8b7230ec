"""A bounded tool loop, run for several tasks in lockstep so each step is one batched model call.

Each step asks every unfinished task's conversation for its next move with the tools offered. A reply
without tool calls ends that task's loop; a reply with calls runs them (at most `max_calls_per_step`;
the model work the tools need, for all tasks at once, is one more batched call) and sends the results
back as `tool` messages. Loops stop at `max_steps`, or when a task has spent `max_total_tokens`
generating. Then one last request per task, constrained to the task's JSON schema, writes the result
from everything the conversation gathered: the loop always ends in valid, structured output.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glimpse.agents.client import Completion, ModelClient, ModelRequest
from glimpse.agents.toolcalls import ToolCall, function_spec


class ToolError(Exception):
    """Bad arguments for a tool: the message goes back to the model as the tool's result."""


@dataclass
class ToolPlan:
    """How one call runs: model requests (may be none) and what to make of their completions."""

    requests: list[ModelRequest]
    finish: Callable[[list[Completion]], str]
    arguments: dict[str, Any]  # the arguments as used (checked, clamped): recorded in the trace


def done(result: str, arguments: dict[str, Any]) -> ToolPlan:
    """A plan for a tool that needs no model: its result is ready."""
    return ToolPlan([], lambda _: result, arguments)


@dataclass
class Tool:
    name: str
    description: str
    properties: dict[str, Any]
    required: list[str]
    plan: Callable[[dict[str, Any]], ToolPlan]

    def spec(self) -> dict[str, Any]:
        return function_spec(self.name, self.description, self.properties, self.required)


@dataclass
class LoopLimits:
    max_steps: int = 6  # model turns that may call tools
    max_calls_per_step: int = 4
    max_tokens_per_step: int = 512
    max_total_tokens: int = 4096  # generated over all steps of one task (the final answer is extra)
    max_result_chars: int = 4000  # each tool result, as the model reads it


@dataclass
class Task:
    messages: list[dict[str, Any]]  # system and user: what to do, and the material
    final_instruction: str  # asked after the loop
    final_schema: dict[str, Any]
    final_max_tokens: int = 1024
    tools: list[Tool] | None = None  # this task's own tools, instead of those `run_loops` is given
    max_num_tiles: int | None = None  # for images in `messages`
    final_logprobs: bool = False  # ask for the final answer's token log-probabilities


@dataclass
class LoopResult:
    final: Any  # the schema-valid JSON of the last request, or None when it failed
    steps: list[dict[str, Any]]  # {"step", "text", "calls": [{"name", "arguments", "result"}]}
    stopped: str  # "answered", "max_steps", "max_tokens" or "error"
    error: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    final_completion: Completion | None = None  # the last request's completion (its text and logprobs)


@dataclass
class _State:
    task: Task
    messages: list[dict[str, Any]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    error: str | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    final: Completion | None = None


def _call_error(call: ToolCall, tools: dict[str, Tool]) -> str | None:
    if call.name not in tools:
        return f"error: no tool named {call.name!r}; the tools are {sorted(tools)}"
    missing = [k for k in tools[call.name].required if k not in call.arguments]
    return f"error: {call.name} needs {missing}" if missing else None


def run_loops(
    client: ModelClient, tasks: list[Task], tools: list[Tool], limits: LoopLimits | None = None,
    temperature: float = 0.0,
) -> list[LoopResult]:  # fmt: skip
    limits = limits or LoopLimits()
    states = [_State(task, list(task.messages)) for task in tasks]
    for step in range(1, limits.max_steps + 1):
        active = [s for s in states if s.stopped is None]
        if not active:
            break
        requests = [
            ModelRequest(
                s.messages,
                tools=[t.spec() for t in s.task.tools or tools],
                temperature=temperature,
                max_tokens=max(1, min(limits.max_tokens_per_step, limits.max_total_tokens - s.tokens)),
                max_num_tiles=s.task.max_num_tiles,
            )  # fmt: skip
            for s in active
        ]
        pending: list[tuple[_State, ToolCall, ToolPlan | None, str | None, dict]] = []
        for s, out in zip(active, client.complete(requests)):
            if out.error:
                s.stopped, s.error = "error", out.error
                continue
            s.tokens += out.completion_tokens
            s.prompt_tokens += out.prompt_tokens
            record: dict[str, Any] = {"step": step, "text": out.text, "calls": []}
            s.steps.append(record)
            if not out.tool_calls:
                s.messages.append({"role": "assistant", "content": out.text})
                s.stopped = "answered"
                continue
            calls = out.tool_calls[: limits.max_calls_per_step]
            s.messages.append(
                {
                    "role": "assistant",
                    "content": out.text or None,
                    "tool_calls": [c.to_openai() for c in calls],
                }
            )
            by_name = {t.name: t for t in s.task.tools or tools}
            for call in calls:
                problem, plan = _call_error(call, by_name), None
                if problem is None:
                    try:
                        plan = by_name[call.name].plan(call.arguments)
                    except ToolError as e:
                        problem = f"error: {e}"
                pending.append((s, call, plan, problem, record))
            if s.tokens >= limits.max_total_tokens:
                s.stopped = "max_tokens"
        batch = [r for _, _, plan, _, _ in pending if plan is not None for r in plan.requests]
        results = iter(client.complete(batch) if batch else [])
        for s, call, plan, problem, record in pending:
            if plan is not None:
                outs = [next(results) for _ in plan.requests]
                failed = next((o.error for o in outs if o.error), None)
                result = f"error: {failed}" if failed else plan.finish(outs)
            else:
                result = problem or "error"
            result = result[: limits.max_result_chars]
            s.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})
            args = plan.arguments if plan is not None else call.arguments
            record["calls"].append({"name": call.name, "arguments": args, "result": result})
    for s in states:
        if s.stopped is None:
            s.stopped = "max_steps"
    return _finish(client, states, temperature)


def _finish(client: ModelClient, states: list[_State], temperature: float) -> list[LoopResult]:
    """The last request of each task: its answer under its schema."""
    live = [s for s in states if s.error is None]
    requests = [
        ModelRequest(
            s.messages + [{"role": "user", "content": s.task.final_instruction}],
            json_schema=s.task.final_schema,
            max_tokens=s.task.final_max_tokens,
            temperature=temperature,
            max_num_tiles=s.task.max_num_tiles,
            logprobs=s.task.final_logprobs,
        )  # fmt: skip
        for s in live
    ]
    finals: dict[int, Any] = {}
    for s, out in zip(live, client.complete(requests) if requests else []):
        s.prompt_tokens += out.prompt_tokens
        s.tokens += out.completion_tokens
        s.final = out
        try:
            finals[id(s)] = out.json()
        except ValueError as e:
            s.error = (
                out.error or f"the final answer is not valid JSON ({e}; finish_reason {out.finish_reason})"
            )
    return [
        LoopResult(
            final=finals.get(id(s)),
            steps=s.steps,
            stopped=s.stopped or "max_steps",
            error=s.error,
            completion_tokens=s.tokens,
            prompt_tokens=s.prompt_tokens,
            final_completion=s.final,
        )  # fmt: skip
        for s in states
    ]


def dumps(data: Any) -> str:
    """Tool results as compact JSON."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
