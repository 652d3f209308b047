"""A minimal chatbot: the classic loop, history kept in a list, answers streamed.

    export CHATGATE_BASE_URL=http://127.0.0.1:8000/v1 CHATGATE_API_KEY=sk-cg-...
    python examples/chatbot.py --model chatgate-mini       # type, Enter; "quit" or Ctrl-D ends

The whole history goes with every request, which works with any OpenAI-compatible server.
For a history kept by the server, see ``support_bot.py`` or run ``chatgate chat``.
Exits 0 at the end of the input, 1 on an API error, 2 without an API key.
"""

from __future__ import annotations

import argparse
import sys

import openai
from openai.types.chat import ChatCompletionMessageParam

from chatgate.client import MissingAPIKeyError, OpenAI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chatgate-mini")
    parser.add_argument("--system", default="You are a friendly, concise assistant.")
    args = parser.parse_args(argv)
    try:
        client = OpenAI()
    except MissingAPIKeyError as exc:
        print(exc, file=sys.stderr)
        return 2
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": args.system}]
    while True:
        print("you: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip().lower() in ("quit", "exit"):
            print()
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        print("bot: ", end="", flush=True)
        parts: list[str] = []
        try:
            stream = client.chat.completions.create(
                model=args.model, messages=messages, stream=True
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                    print(chunk.choices[0].delta.content, end="", flush=True)
        except openai.OpenAIError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            return 1
        print()
        messages.append({"role": "assistant", "content": "".join(parts)})


if __name__ == "__main__":
    sys.exit(main())
