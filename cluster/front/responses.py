"""The OpenAI Responses API dialect, mapped onto chat requests (and so onto harmony).

In: `input` (a string, or items: messages with input_text parts, function_call,
function_call_output, reasoning), `instructions`, `tools` (function tools, flat
format), `reasoning.effort`, `max_output_tokens`, sampling fields.
Out: a `response` object with reasoning, message and function_call output items."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from gptoss_ray.cluster.client.chat import (
    Event,
    MessageEnd,
    TextDelta,
    ToolCallStart,
    logprob_entries,
)
from gptoss_ray.cluster.front.response_store import ResponseStore
from gptoss_ray.model.harmony import HarmonyError
from gptoss_ray.model.types import UnknownRequest

LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for them


def responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HarmonyError("the request body is a JSON object")
    messages: list[dict[str, Any]] = []
    if body.get("instructions") is not None:
        messages.append({"role": "developer", "content": str(body["instructions"])})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise HarmonyError("input: a string or a non-empty list of items")
    reasoning: str | None = None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise HarmonyError(f"input[{i}]: an item is a JSON object")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _text(item.get("content"), f"input[{i}].content")
            if role == "assistant":
                messages.append(
                    {"role": "assistant", "content": text, "reasoning_content": reasoning}
                )
                reasoning = None
            else:
                messages.append({"role": role, "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        elif kind == "function_call":
            call = {
                "id": item.get("call_id") or item.get("id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [call],
                        "reasoning_content": reasoning,
                    }
                )
                reasoning = None
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": output if isinstance(output, str) else str(output),
                }
            )
        else:
            raise HarmonyError(f"input[{i}].type: {kind!r} is not supported")
    chat: dict[str, Any] = {"messages": messages}
    tools = body.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise HarmonyError("tools: a list")
        chat["tools"] = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise HarmonyError(f"tools[{i}]: only function tools are supported")
            fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            # strict by default on Responses (not on chat completions), as OpenAI has it
            fn["strict"] = tool.get("strict") is not False
            chat["tools"].append({"type": "function", "function": fn})
    effort = (body.get("reasoning") or {}).get("effort")
    if effort is not None:
        chat["reasoning_effort"] = effort
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p", "seed", "model", "max_reasoning_tokens"):
        if body.get(key) is not None:
            chat[key] = body[key]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":  # flat on Responses
        inner = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": inner}
    elif fmt is not None:
        chat["response_format"] = fmt
    include = body.get("include") or []
    if not isinstance(include, list) or not all(isinstance(x, str) for x in include):
        raise HarmonyError("include: a list of strings")
    # logprobs come with the answer's text when asked by either field
    if LOGPROBS in include or body.get("top_logprobs") is not None:
        chat["logprobs"] = True
        chat["top_logprobs"] = body.get("top_logprobs") or 0
    choice = body.get("tool_choice")
    if choice in ("auto", "none", "required"):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":  # flat on Responses
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif choice is not None:
        raise HarmonyError(
            "tool_choice: auto, none, required or {type: function, name}", param="tool_choice"
        )
    return chat


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's input as Responses items, each with an id (a string input is one
    user message), as they are stored and listed (`GET .../input_items`)."""
    items = body.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise HarmonyError("input: a string or a non-empty list of items")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise HarmonyError(f"input[{i}]: an item is a JSON object")
        item = {"type": "message", **item}
        if item["type"] == "message" and isinstance(item.get("content"), str):
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        item.setdefault("id", f"{_ID_PREFIX.get(item['type'], 'item')}_{uuid.uuid4().hex}")
        out.append(item)
    return out


_ID_PREFIX = {"message": "msg", "reasoning": "rs", "function_call": "fc"}


def conversation(
    body: dict[str, Any], store: ResponseStore
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The items the model reads (a previous response's conversation, then the input) and
    the chat request they make. Instructions are not carried over from the previous
    response, as OpenAI does."""
    if not isinstance(body, dict):
        raise HarmonyError("the request body is a JSON object")
    items = input_items(body)
    previous = body.get("previous_response_id")
    if previous is not None:
        entry = store.get(str(previous))
        if entry is None:
            raise UnknownRequest(
                f"previous_response_id: no stored response {previous!r} (never stored, "
                "deleted, or expired)",
                param="previous_response_id",
            )
        items = entry["items"] + items
    return items, responses_to_chat({**body, "input": items})


def _text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in (
                "input_text",
                "output_text",
                "text",
            ):
                raise HarmonyError(f"{where}[{j}]: only text parts are supported")
            out.append(part.get("text", ""))
        return "".join(out)
    raise HarmonyError(f"{where}: a string or a list of text parts")


def response_object(
    reply: dict[str, Any],
    model: str,
    *,
    response_id: str | None = None,
    request: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A finished chat reply -> a Responses API `response` (for `request`: its
    previous_response_id and store echoed back)."""
    request = request or {}
    message = reply["message"]
    output: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        output.append(reasoning_item(message["reasoning_content"]))
    if message.get("content"):
        output.append(message_item(message["content"], logprobs=reply.get("logprobs")))
    for call in message.get("tool_calls") or []:
        output.append(
            function_call_item(call["id"], call["function"]["name"], call["function"]["arguments"])
        )
    usage = reply["usage"]
    incomplete = reply["finish_reason"] == "length"
    return {
        "id": response_id or f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": request.get("previous_response_id"),
        "store": request.get("store", True) is not False,
        "tool_choice": request.get("tool_choice") or "auto",
        "tools": request.get("tools") or [],
        "usage": {
            "input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"],
        },
    }


def reasoning_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id or f"rs_{uuid.uuid4().hex}",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def message_item(
    text: str,
    item_id: str | None = None,
    status: str = "completed",
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id or f"msg_{uuid.uuid4().hex}",
        "role": "assistant",
        "status": status,
        "content": [output_text(text, logprobs)],
    }


def output_text(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """An answer's text part (with its tokens' logprobs, when asked)."""
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return part


def function_call_item(
    call_id: str, name: str, arguments: str, item_id: str | None = None, status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id or f"fc_{uuid.uuid4().hex}",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


class ResponseStream:
    """A streamed `response` from a reply's events: output items (reasoning, message,
    function call) are opened, filled and closed as the events come; `send(type,
    **fields)` writes one server-sent event."""

    def __init__(
        self, send: Callable[..., None], response_id: str, model: str, logprobs: bool = False
    ) -> None:
        """logprobs: the request asked for them (the answer's deltas and parts carry them)."""
        self.send, self.response_id, self.model = send, response_id, model
        self.logprobs = logprobs
        self.items: list[dict[str, Any]] = []
        self.texts: list[str] = []
        self.item_logprobs: list[list[dict[str, Any]]] = []
        shell = {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "model": model,
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
        }
        send("response.created", response=shell)

    def handle(self, event: Event) -> None:
        if isinstance(event, ToolCallStart):
            self._open(
                function_call_item(event.call_id, event.name, "", status="in_progress"), "call"
            )
        elif isinstance(event, TextDelta) and event.kind == "call":
            self.texts[-1] += event.text
            self.send(
                "response.function_call_arguments.delta",
                item_id=self.items[-1]["id"],
                output_index=len(self.items) - 1,
                delta=event.text,
            )
        elif isinstance(event, TextDelta):
            if not self.items or self.items[-1].get("_open") != event.kind:
                reasoning = event.kind == "reasoning"
                item = reasoning_item("") if reasoning else message_item("", status="in_progress")
                self._open(item, event.kind)
            self.texts[-1] += event.text
            fields = dict(
                item_id=self.items[-1]["id"],
                output_index=len(self.items) - 1,
                content_index=0,
                delta=event.text,
            )
            if event.kind == "reasoning":
                self.send("response.reasoning_text.delta", **fields)
            else:
                entries = logprob_entries(event.logprobs)
                self.item_logprobs[-1] += entries
                self.send("response.output_text.delta", **fields, logprobs=entries)
        elif isinstance(event, MessageEnd) and self.items and self.items[-1].get("_open"):
            self._close()

    def complete(self, reply: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
        """The last event; -> the response it carries."""
        if self.items and self.items[-1].get("_open"):
            self._close()
        final = response_object(reply, self.model, response_id=self.response_id, request=request)
        final["output"] = self.items
        self.send("response.completed", response=final)
        return final

    def _open(self, item: dict[str, Any], kind: str) -> None:
        item["_open"] = kind
        self.items.append(item)
        self.texts.append("")
        self.item_logprobs.append([])
        index = len(self.items) - 1
        self.send("response.output_item.added", output_index=index, item=item)
        if item["type"] in ("message", "reasoning"):
            part_type = "output_text" if item["type"] == "message" else "reasoning_text"
            self.send(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part={"type": part_type, "text": ""},
            )

    def _close(self) -> None:
        item, text, index = self.items[-1], self.texts[-1], len(self.items) - 1
        kind = item.pop("_open")
        if kind == "call":
            item.update(arguments=text, status="completed")
            self.send(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=index,
                arguments=text,
            )
        else:
            answer = kind == "content"
            done = "response.output_text.done" if answer else "response.reasoning_text.done"
            self.send(done, item_id=item["id"], output_index=index, content_index=0, text=text)
            part = {"type": "reasoning_text", "text": text}
            if answer:
                part = output_text(text, self.item_logprobs[-1] if self.logprobs else None)
                item["status"] = "completed"
            item["content"] = [part]
            self.send(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            )
        self.send("response.output_item.done", output_index=index, item=item)


def remember(
    store: ResponseStore, request: dict[str, Any], items: list[dict[str, Any]], response: dict
) -> None:
    """Stores a finished response with its conversation (unless the request said
    `store: false`): the items read, then the response's output items."""
    if request.get("store", True) is not False:
        store.put(response, items + response["output"], inputs=len(items))
