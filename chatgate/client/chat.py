"""``chatgate chat``: an interactive terminal chatbot on top of :mod:`chatgate.client`.

    chatgate chat [--model M] [--conversation ID | --new] [--system TEXT] [--base-url URL]
    python -m chatgate.client.chat ...   # the same, with only the client installed

Answers are streamed as they are generated. Commands: ``/reset`` (start afresh), ``/usage``
(tokens used in this session and the rate-limit budget left), ``/help``, ``/quit``.

The history is kept by the server (chatgate's sessions: ``POST /v1/conversations``, then
each turn sent with ``extra_body={"conversation": id}``), so a conversation can be resumed
later with ``--conversation ID``. Against a server without the conversations API the
history is kept here in memory instead, and the chat says so when it starts.

The key and URL come from ``CHATGATE_API_KEY`` / ``CHATGATE_BASE_URL`` (see
:func:`chatgate.client.resolve_config`); a key is never taken on the command line, where
it would end up in the shell's history.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from chatgate.client._limiter import BudgetState, RateLimiter

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletionMessageParam

# ``openai`` is imported where it is used, not above: the ``chatgate`` command imports this
# module to register ``chat``, and its other commands should not pay ~1 s for ``openai``.

__all__ = ["Conversation", "Totals", "add_parser", "describe_error", "main", "run"]

HELP = "commands: /reset (start a new conversation), /usage, /help, /quit"
DESCRIPTION = "Chat with a model in the terminal, answers streamed. " + HELP


@dataclass(slots=True)
class Totals:
    """Tokens used by a conversation so far, as the server reported them."""

    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class Conversation:
    """A chat that remembers: on the server when it keeps conversations, else in memory.

    ``conversation_id`` resumes a stored conversation; ``server_side`` forces the mode
    (``None``: use the server's conversations API when it has one). The system prompt is
    sent with every turn (the server stores only the turns, not the instructions).
    """

    def __init__(
        self,
        client: openai.OpenAI,
        model: str,
        *,
        system: str | None = None,
        conversation_id: str | None = None,
        server_side: bool | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.system = system
        self.id: str | None = conversation_id
        self.server_side = conversation_id is not None or server_side is not False
        self._probe = server_side is None and conversation_id is None
        self.history: list[ChatCompletionMessageParam] = []
        self.totals = Totals()
        if conversation_id is not None:
            client.conversations.retrieve(conversation_id)  # 404 when unknown or not ours

    def _ensure_started(self) -> None:
        import openai

        if not self.server_side or self.id is not None:
            return
        try:
            self.id = self.client.conversations.create(metadata={"source": "chatgate chat"}).id
        except openai.NotFoundError:
            if not self._probe:
                raise
            self.server_side = False  # this server has no conversations API
        self._probe = False

    def start(self) -> None:
        """Open the conversation now (on the server, when it keeps them)."""
        self._ensure_started()

    def reset(self) -> None:
        """Forget the history: a new server conversation, or an empty local one."""
        self.history.clear()
        self.totals = Totals()
        if self.server_side:
            self.id = None
            self._ensure_started()

    def _messages(self, text: str) -> list[ChatCompletionMessageParam]:
        messages: list[ChatCompletionMessageParam] = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        if not self.server_side:
            messages += self.history
        messages.append({"role": "user", "content": text})
        return messages

    def ask(self, text: str, on_delta: Callable[[str], None] | None = None) -> str:
        """Send one user turn; stream the answer to ``on_delta``; return the whole answer."""
        self._ensure_started()
        extra: dict[str, Any] = {"conversation": self.id} if self.server_side else {}
        stream = self.client.chat.completions.create(
            model=self.model,
            messages=self._messages(text),
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra or None,
        )
        parts: list[str] = []
        with stream:
            for chunk in stream:
                if chunk.usage is not None:
                    self.totals.prompt_tokens += chunk.usage.prompt_tokens
                    self.totals.completion_tokens += chunk.usage.completion_tokens
                for choice in chunk.choices:
                    piece = choice.delta.content
                    if choice.index == 0 and piece:
                        parts.append(piece)
                        if on_delta is not None:
                            on_delta(piece)
        answer = "".join(parts)
        self.totals.turns += 1
        if not self.server_side:
            self.history.append({"role": "user", "content": text})
            self.history.append({"role": "assistant", "content": answer})
        return answer


def describe_error(exc: openai.OpenAIError) -> str:
    """One readable line for an error from the ``openai`` package (never contains a key)."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error") if isinstance(body.get("error"), dict) else body
        message = error.get("message") if isinstance(error, dict) else None
        code = f" {exc.code}" if exc.code else ""
        return f"{exc.status_code}{code}: {message or exc.message}"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach the server ({exc.message})"
    return str(exc)


def _budget(name: str, budget: BudgetState) -> str | None:
    if budget.limit is None or budget.remaining is None:
        return None
    return f"{budget.remaining:,}/{budget.limit:,} {name}"


def _usage_line(conversation: Conversation, limiter: RateLimiter) -> str:
    t = conversation.totals
    turns = f"{t.turns} turn" + ("" if t.turns == 1 else "s")
    line = (
        f"this conversation: {turns}, {t.prompt_tokens:,} prompt + "
        f"{t.completion_tokens:,} completion = {t.total_tokens:,} tokens"
    )
    state = limiter.state()
    budgets = [
        b for b in (_budget("requests", state.requests), _budget("tokens", state.tokens)) if b
    ]
    if budgets:
        line += "; rate limit left this minute: " + ", ".join(budgets)
    return line


def _default_model(client: openai.OpenAI) -> str:
    for model in client.models.list():
        return model.id
    raise SystemExit("chatgate chat: error: the server lists no models; pass --model")


def _announce(conversation: Conversation, out: TextIO) -> None:
    if conversation.server_side:
        where = f"kept by the server as {conversation.id}"
    else:
        where = "kept here in memory: this server has no conversations API"
    print(f"chatting with {conversation.model}; history {where}. {HELP}", file=out)


def _read_line(stdin: TextIO, out: TextIO, interactive: bool) -> str:
    """The next line typed, with its newline; ``""`` at the end of input."""
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
        try:
            return input("you> ") + "\n"
        except EOFError:
            return ""
    out.write("you> ")
    out.flush()
    return stdin.readline()


def run(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Run the chat loop with parsed ``args``; the exit code (0 at /quit or end of input)."""
    import openai

    from chatgate.client._config import MissingAPIKeyError
    from chatgate.client._openai import OpenAI

    stdin = stdin or sys.stdin
    out = out or sys.stdout
    err = sys.stderr
    if args.conversation is not None and not args.conversation.strip():
        print("chatgate chat: error: --conversation needs an ID (conv_...)", file=err)
        return 2
    limiter = RateLimiter()
    try:
        client = OpenAI(base_url=args.base_url, limiter=limiter)
        model = args.model or _default_model(client)
        if args.model:  # known before a conversation is made for it (QA: made, then a 404)
            try:
                client.models.retrieve(args.model)
            except openai.NotFoundError as exc:
                # Only the server's word that the model is unknown: a server without this
                # route (many OpenAI-compatible ones) may still answer any model.
                if exc.code == "model_not_found":
                    print(
                        f"chatgate chat: error: no such model {args.model} ({describe_error(exc)})",
                        file=err,
                    )
                    return 2
        conversation = Conversation(
            client,
            model,
            system=args.system,
            conversation_id=args.conversation,
            server_side=True if args.conversation else None,
        )
        conversation.start()
    except MissingAPIKeyError as exc:
        print(f"chatgate chat: error: {exc}", file=err)
        return 2
    except openai.NotFoundError as exc:
        what = f"conversation {args.conversation}" if args.conversation else "resource"
        print(f"chatgate chat: error: no such {what} ({describe_error(exc)})", file=err)
        return 2
    except openai.OpenAIError as exc:
        print(f"chatgate chat: error: {describe_error(exc)}", file=err)
        return 1
    _announce(conversation, out)

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    interactive = stdin is sys.stdin and out is sys.stdout and stdin.isatty()
    while True:
        try:
            line = _read_line(stdin, out, interactive)
        except KeyboardInterrupt:
            line = ""
        if not line:
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        command = text.lower()
        if command in ("/quit", "/exit", "/q"):
            return 0
        if command == "/help":
            print(HELP, file=out)
            continue
        if command == "/usage":
            print(_usage_line(conversation, limiter), file=out)
            continue
        try:
            if command == "/reset":
                conversation.reset()
                where = f" ({conversation.id})" if conversation.id else ""
                print(f"new conversation{where}", file=out)
                continue
            if text.startswith("/"):
                print(f"unknown command {text.split()[0]}; {HELP}", file=out)
                continue
            out.write("assistant> ")
            conversation.ask(text, on_delta=show)
            out.write("\n")
        except KeyboardInterrupt:
            out.write("\n(interrupted)\n")
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            print(f"\nchatgate chat: error: {describe_error(exc)}", file=err)
            return 1
        except openai.OpenAIError as exc:
            print(f"\nerror: {describe_error(exc)}", file=err)
        out.flush()


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the chat options to ``parser``."""
    parser.add_argument("--model", help="the model to talk to (default: the first listed)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--conversation", metavar="ID", help="resume a stored conversation")
    which.add_argument("--new", action="store_true", help="start a new conversation (the default)")
    parser.add_argument("--system", help="a system prompt sent with every turn")
    parser.add_argument(
        "--base-url", help="the API's base URL (default: CHATGATE_BASE_URL, then the local one)"
    )
    return parser


def _from_cli(_settings: object, args: argparse.Namespace) -> None:
    # The chatgate command logs at INFO; a line per HTTP request would drown the chat.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    code = run(args)
    if code:
        raise SystemExit(code)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``chat`` on the ``chatgate`` command's subparsers (``cli.build_parser``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "chat", help="chat with a model in the terminal", description=DESCRIPTION
    )
    configure(parser)
    parser.set_defaults(func=_from_cli)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m chatgate.client.chat``: the chat without the server's command line."""
    parser = configure(argparse.ArgumentParser(prog="chatgate chat", description=DESCRIPTION))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
