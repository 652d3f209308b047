"""Personal assistant: tool (function) calling, the tools executed here, on your machine.

    export CHATGATE_BASE_URL=http://127.0.0.1:8000/v1 CHATGATE_API_KEY=sk-cg-...
    python examples/personal_assistant.py --model gpt-4o-mini \\
        "Book the dentist next Tuesday at 10:00 and remind me the day before"
    python examples/personal_assistant.py --stream ...        # tool calls arrive as deltas

The model sees two tools, ``schedule_event`` and ``set_reminder``. When it answers with tool
calls, this script runs them (they write to a small JSON agenda, ``--agenda``, or memory), sends
the results back, and repeats until the model answers in words. The model needs tool-calling
support (OpenAI models, or e.g. Llama 3.1 on vLLM). Exits 0 with a final answer, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from chatgate.client import MissingAPIKeyError, OpenAI

TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "schedule_event",
            "description": "Put an event in the user's agenda.",
            "parameters": {
                "type": "object",
                "properties": {
                    "title": {"type": "string", "description": "What the event is"},
                    "when": {"type": "string", "description": "Date and time, ISO 8601"},
                    "duration_minutes": {"type": "integer", "description": "Length"},
                },
                "required": ["title", "when"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "set_reminder",
            "description": "Remind the user of something at a given time.",
            "parameters": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "description": "What to remind of"},
                    "when": {"type": "string", "description": "Date and time, ISO 8601"},
                },
                "required": ["text", "when"],
            },
        },
    },
]
SYSTEM = (
    "You are a personal assistant. Use the tools to schedule events and set reminders; "
    "then confirm to the user in one or two sentences what you did."
)


class Agenda:
    """The tools' side: events and reminders, in memory or in a JSON file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.items: list[dict[str, Any]] = []
        if path is not None and path.exists():
            self.items = json.loads(path.read_text(encoding="utf-8"))

    def _add(self, item: dict[str, Any]) -> str:
        self.items.append(item)
        if self.path is not None:
            self.path.write_text(json.dumps(self.items, indent=2), encoding="utf-8")
        return json.dumps({"ok": True, "id": len(self.items), **item})

    def schedule_event(self, title: str, when: str, duration_minutes: int = 60) -> str:
        return self._add(
            {"kind": "event", "title": title, "when": when, "minutes": duration_minutes}
        )

    def set_reminder(self, text: str, when: str) -> str:
        return self._add({"kind": "reminder", "text": text, "when": when})

    def call(self, name: str, arguments: str) -> str:
        """Run one tool call; errors go back to the model as the result, not as a crash."""
        try:
            args = json.loads(arguments or "{}")
            if name == "schedule_event":
                return self.schedule_event(**args)
            if name == "set_reminder":
                return self.set_reminder(**args)
            return json.dumps({"ok": False, "error": f"unknown tool {name}"})
        except (ValueError, TypeError) as exc:
            return json.dumps({"ok": False, "error": f"bad arguments: {exc}"})


def complete(
    client: openai.OpenAI, model: str, messages: list[ChatCompletionMessageParam], stream: bool
) -> tuple[str, list[dict[str, Any]]]:
    """One model turn: its text and its tool calls (assembled from deltas when streaming)."""
    if not stream:
        message = (
            client.chat.completions.create(model=model, messages=messages, tools=TOOLS)
            .choices[0]
            .message
        )
        calls = [
            {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
            for c in message.tool_calls or []
            if c.type == "function"
        ]
        return message.content or "", calls
    text: list[str] = []
    slots: dict[int, dict[str, Any]] = {}
    for chunk in client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, stream=True
    ):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text.append(delta.content or "")
        for call in delta.tool_calls or []:
            slot = slots.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] = call.id or slot["id"]
            if call.function is not None:
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
    return "".join(text), [slots[i] for i in sorted(slots)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chatgate-mini")
    parser.add_argument("--stream", action="store_true", help="stream (tool-call deltas)")
    parser.add_argument("--agenda", type=Path, help="a JSON file to keep the agenda in")
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument(
        "request",
        nargs="?",
        default="Schedule a dentist appointment next Tuesday at 10:00, "
        "and remind me to bring my insurance card the day before.",
    )
    args = parser.parse_args(argv)
    agenda = Agenda(args.agenda)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": args.request},
    ]
    try:
        client = OpenAI()
        for _ in range(args.max_steps):
            text, calls = complete(client, args.model, messages, args.stream)
            if not calls:
                print(f"assistant: {text}")
                for item in agenda.items:
                    print(f"  agenda: {json.dumps(item)}")
                return 0
            messages.append(
                {
                    "role": "assistant",
                    "content": text or None,
                    "tool_calls": [
                        {
                            "id": c["id"],
                            "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]},
                        }
                        for c in calls
                    ],
                }
            )
            for call in calls:
                result = agenda.call(call["name"], call["arguments"])
                print(f"tool: {call['name']}({call['arguments']}) -> {result}")
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    except MissingAPIKeyError as exc:
        print(exc, file=sys.stderr)
        return 2
    except openai.OpenAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"no final answer after {args.max_steps} steps", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
