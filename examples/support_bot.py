"""Customer support bot: a system prompt, and a conversation the server remembers.

    export CHATGATE_BASE_URL=http://127.0.0.1:8000/v1 CHATGATE_API_KEY=sk-cg-...
    python examples/support_bot.py --model chatgate-mini "My invoice is wrong" "It was in May"
    printf 'Where is my order?\\nIt is #1234\\n' | python examples/support_bot.py

Each question is one turn of the same conversation: chatgate stores the history
(``/v1/conversations``), so only the new question travels with each request; the system prompt
is sent with every turn. Against a server without conversations the history is kept locally.
Exits 0 when every question got an answer, 1 on an API error, 2 without an API key.
"""

from __future__ import annotations

import argparse
import sys

import openai

from chatgate.client import MissingAPIKeyError, OpenAI
from chatgate.client.chat import Conversation, describe_error

SYSTEM = (
    "You are the customer support assistant of Acme Cloud, a web hosting company. "
    "Answer politely and briefly. Ask for the order number when it is needed. "
    "Never promise refunds; offer to open a ticket instead."
)
DEMO = ["Hello, my website has been down since this morning.", "The order number is 4711."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chatgate-mini")
    parser.add_argument("--system", default=SYSTEM, help="the support policy (system prompt)")
    parser.add_argument("questions", nargs="*", help="default: read stdin, else a short demo")
    args = parser.parse_args(argv)
    questions = args.questions or (
        [line.strip() for line in sys.stdin if line.strip()] if not sys.stdin.isatty() else DEMO
    )
    try:
        client = OpenAI()
        conversation = Conversation(client, args.model, system=args.system)
        conversation.start()
        where = conversation.id if conversation.server_side else "kept locally"
        print(f"[conversation: {where}]")
        for question in questions:
            print(f"customer: {question}")
            print(f"support:  {conversation.ask(question)}")
    except MissingAPIKeyError as exc:
        print(exc, file=sys.stderr)
        return 2
    except openai.OpenAIError as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    t = conversation.totals
    print(f"[turns: {t.turns}, tokens: {t.total_tokens}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
