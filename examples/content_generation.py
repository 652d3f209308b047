"""Content generation: a batch of prompts, a progress bar, and client-side rate limiting.

    export CHATGATE_BASE_URL=http://127.0.0.1:8000/v1 CHATGATE_API_KEY=sk-cg-...
    python examples/content_generation.py --model chatgate-mini --rpm 20 --out posts.jsonl
    python examples/content_generation.py --prompts topics.txt      # one topic per line

Several threads share one client, so they share its rate limiter: the batch runs as fast as
``--rpm`` (and the server's own limits, read from its headers) allow, and waits instead of
collecting 429s. Failed items are reported and the others kept. Results are JSON lines
(``{"topic", "text", "tokens"}``) in the order of the topics. Exits 0 when every item succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, TextIO

import openai

from chatgate.client import MissingAPIKeyError, OpenAI

TOPICS = [
    "why backups matter for small businesses",
    "three tips for writing clear documentation",
    "how to choose a strong password",
    "the benefits of a standing desk",
    "what an API gateway does",
    "how rate limits protect a service",
]
PROMPT = "Write a short blog post introduction (3 sentences) about: {topic}"


class ProgressBar:
    """``[##########----------]  5/10  50%  2.1/s`` on one line of stderr, thread-safe."""

    def __init__(self, total: int, out: TextIO = sys.stderr, width: int = 30) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.out, self.width = out, width
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._draw()

    def advance(self, ok: bool = True) -> None:
        with self._lock:
            self.done += 1
            self.failed += 0 if ok else 1
            self._draw()

    def _draw(self) -> None:
        filled = self.width * self.done // max(self.total, 1)
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        failed = f"  {self.failed} failed" if self.failed else ""
        self.out.write(
            f"\r[{'#' * filled}{'-' * (self.width - filled)}] {self.done}/{self.total} "
            f"{100 * self.done // max(self.total, 1):3d}%  {rate:.1f}/s{failed}   "
        )
        if self.done == self.total:
            self.out.write("\n")
        self.out.flush()


def generate(client: openai.OpenAI, model: str, topic: str, max_tokens: int) -> dict[str, Any]:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT.format(topic=topic)}],
        max_tokens=max_tokens,
    )
    tokens = reply.usage.total_tokens if reply.usage else None
    return {"topic": topic, "text": reply.choices[0].message.content or "", "tokens": tokens}


def _positive(text: str) -> int:
    """A whole number of at least 1, or argparse's one-line error (not a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="chatgate-mini")
    parser.add_argument("--prompts", help="a file of topics, one per line (default: a demo set)")
    parser.add_argument("--rpm", type=_positive, default=30, help="client-side requests/minute")
    parser.add_argument("--tpm", type=_positive, default=None, help="client-side tokens/minute")
    parser.add_argument("--workers", type=_positive, default=4, help="requests in flight at once")
    parser.add_argument("--max-tokens", type=_positive, default=120)
    parser.add_argument("--out", help="write JSON lines here (default: stdout)")
    args = parser.parse_args(argv)
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as fh:
            topics = [line.strip() for line in fh if line.strip()]
    else:
        topics = TOPICS
    try:
        client = OpenAI(rpm=args.rpm, tpm=args.tpm)
    except MissingAPIKeyError as exc:
        print(exc, file=sys.stderr)
        return 2

    results: list[dict[str, Any] | None] = [None] * len(topics)
    bar = ProgressBar(len(topics))
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {
            pool.submit(generate, client, args.model, topic, args.max_tokens): i
            for i, topic in enumerate(topics)
        }
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except openai.OpenAIError as exc:
                print(f"\n{topics[i]!r} failed: {exc}", file=sys.stderr)
                bar.advance(ok=False)
            else:
                bar.advance()

    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    try:
        for item in results:
            if item is not None:
                out.write(json.dumps(item, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0 if bar.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
