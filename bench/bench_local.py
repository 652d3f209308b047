"""Benchmark of the embedded local model: load time, tokens/s (one and two requests), memory.

    .venv/bin/python bench/bench_local.py [--threads N] [--tokens 128] [--runs 3]
    .venv/bin/python bench/bench_local.py --embeddings-quality  # and MiniLM, if installed

Goes through ``LocalBackend`` (queue, worker thread, streaming), not bare llama.cpp, so the
figures are what a client of the gateway gets. Two concurrent requests share the one worker:
the aggregate rate stays that of one, each request takes about twice as long.
Figures depend on what else runs on the machine; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence

from chatgate.backends.local import LocalBackend
from chatgate.backends.local_embed import resolve_embeddings_kind
from chatgate.settings import ModelConfig, Settings

MODEL = ModelConfig(name="chatgate-mini", backend="local", upstream_model="chatgate-mini")
# Greedy decoding of this prompt runs long, so max_tokens (not EOS) ends the answer.
PROMPT = [{"role": "user", "content": "Count from 1 to 500, one number per line."}]


def rss_mb() -> float:
    """Resident memory of this process now, in MB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def one_stream(backend: LocalBackend, tokens: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, completion tokens) of one streamed request."""
    began = time.perf_counter()
    body = {"messages": PROMPT, "max_tokens": tokens, "temperature": 0}
    stream = await backend.chat_stream(MODEL, body, include_usage=True)
    async for _ in stream:
        pass
    total = time.perf_counter() - began
    assert stream.usage is not None and stream.first_byte_at is not None
    return stream.first_byte_at - began, total, stream.usage.completion_tokens


async def main(args: argparse.Namespace) -> None:
    base_rss = rss_mb()
    backend = LocalBackend(Settings(), threads=args.threads, queue_size=4, embeddings="gguf")
    began = time.perf_counter()
    await backend.start()
    if not backend.available:
        raise SystemExit(f"local model unavailable: {backend.unavailable_reason}")
    print(f"threads              {backend.threads}, context {backend.context_window}")
    print(f"load                 {time.perf_counter() - began:.3f} s (start(), model only)")
    print(f"RSS after load       {rss_mb():.0f} MB (python + imports before: {base_rss:.0f} MB)")

    await one_stream(backend, 8)  # warm-up: first decode allocates the compute buffers

    singles = [await one_stream(backend, args.tokens) for _ in range(args.runs)]
    rates = [n / (total - ttft) for ttft, total, n in singles if n > 1]
    print(
        f"single request       {statistics.median(rates):.1f} tok/s generation "
        f"(median of {len(rates)}), TTFT {statistics.median(s[0] for s in singles) * 1000:.0f} ms, "
        f"{singles[0][2]} tokens"
    )

    pair_rates, pair_walls = [], []
    for _ in range(args.runs):
        began = time.perf_counter()
        pair = await asyncio.gather(*(one_stream(backend, args.tokens) for _ in range(2)))
        wall = time.perf_counter() - began
        pair_rates.append(sum(n for _, _, n in pair) / wall)
        pair_walls.append(max(total for _, total, _ in pair))
    print(
        f"two concurrent       {statistics.median(pair_rates):.1f} tok/s aggregate, "
        f"slowest request {statistics.median(pair_walls):.2f} s (served one after the other)"
    )
    print(f"RSS after generation {rss_mb():.0f} MB")

    texts = [f"Sentence number {i} about cats, dogs and the weather." for i in range(32)]
    began = time.perf_counter()
    await backend.embeddings(MODEL, {"input": texts[:1]})
    first = time.perf_counter() - began
    began = time.perf_counter()
    await backend.embeddings(MODEL, {"input": texts})
    batch = time.perf_counter() - began
    print(
        f"embeddings (gguf)     first call {first:.2f} s (loads the embedding context), "
        f"32 sentences {batch * 1000:.0f} ms"
    )
    print(f"RSS with embeddings  {rss_mb():.0f} MB")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS             {peak:.0f} MB")
    print(f"load average         {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    await backend.close()


# A small hand-labelled similarity set (0 = unrelated ... 4 = same meaning), and a retrieval
# task: each query's right document is the one at the same index.
PAIRS = [
    ("A man is playing a guitar.", "A person plays an acoustic guitar.", 4),
    ("A man is playing a guitar.", "A man is playing a flute.", 2),
    ("A man is playing a guitar.", "The stock market fell sharply today.", 0),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.", 4),
    ("The cat sleeps on the sofa.", "The dog barks at the mailman.", 1),
    ("The cat sleeps on the sofa.", "Quantum computers use qubits.", 0),
    ("How do I reset my password?", "I forgot my password, how can I change it?", 4),
    ("How do I reset my password?", "How do I delete my account?", 2),
    ("How do I reset my password?", "What is the weather in Paris?", 0),
    ("The train was late this morning.", "This morning's train was delayed.", 4),
    ("The train was late this morning.", "The bus arrived on time.", 2),
    ("The train was late this morning.", "She baked a chocolate cake.", 0),
    ("Python is a programming language.", "Python is used to write software.", 3),
    ("Python is a programming language.", "A python is a large snake.", 1),
    ("He bought a new car yesterday.", "Yesterday he purchased a new vehicle.", 4),
    ("He bought a new car yesterday.", "He sold his old bicycle.", 1),
    ("The restaurant serves Italian food.", "You can eat pasta and pizza there.", 3),
    ("The restaurant serves Italian food.", "The museum opens at nine.", 0),
    ("It is raining heavily outside.", "There is a storm with lots of rain.", 3),
    ("It is raining heavily outside.", "The sun is shining brightly.", 1),
]
QUERIES = [
    "How can I get my money back?",
    "What time does the store open?",
    "My package never arrived.",
    "Can I change my delivery address?",
    "Do you ship to Canada?",
    "The app crashes when I log in.",
    "How do I cancel my subscription?",
    "Is there a student discount?",
    "How do I contact support?",
    "Can I pay with PayPal?",
]
DOCS = [
    "Refunds are issued to the original payment method within 5 days.",
    "Our shops are open from 9 am to 6 pm, Monday to Saturday.",
    "If your order is lost in transit, we will send a replacement.",
    "You can edit the shipping address until the order is dispatched.",
    "We deliver to the United States, Canada and Mexico.",
    "If the application closes during sign-in, reinstall the latest version.",
    "Subscriptions can be ended at any time from the account page.",
    "Students get 20% off with a valid university email.",
    "Our help desk answers by chat and email around the clock.",
    "We accept credit cards, PayPal and bank transfers.",
]


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    def ranks(values: Sequence[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den


def score(name: str, embed: Callable[[list[str]], list[list[float]]]) -> None:
    """Print Spearman correlation on PAIRS, top-1 retrieval accuracy and time for one model."""
    began = time.perf_counter()
    left = embed([a for a, _, _ in PAIRS])
    right = embed([b for _, b, _ in PAIRS])
    queries, docs = embed(QUERIES), embed(DOCS)
    elapsed = time.perf_counter() - began
    sims = [_cosine(a, b) for a, b in zip(left, right, strict=True)]
    rho = _spearman(sims, [float(s) for _, _, s in PAIRS])
    hits = sum(
        max(range(len(docs)), key=lambda j: _cosine(q, docs[j])) == i for i, q in enumerate(queries)
    )
    print(
        f"{name:22} spearman {rho:+.2f}   retrieval top-1 {hits}/{len(QUERIES)}   "
        f"{2 * len(PAIRS) + len(QUERIES) + len(DOCS)} texts in {elapsed * 1000:.0f} ms"
    )


async def embeddings_quality(threads: int | None) -> None:
    """Compare the GGUF's own embeddings with all-MiniLM-L6-v2 (when its extra is installed)."""
    kinds = ["gguf"]
    if resolve_embeddings_kind("auto") == "minilm":
        kinds.append("minilm")
    else:
        print("all-MiniLM-L6-v2: the `embeddings` extra is not installed, skipped")
    loop = asyncio.get_running_loop()
    for kind in kinds:
        backend = LocalBackend(Settings(), threads=threads, preload=False, embeddings=kind)
        await backend.start()
        rss = rss_mb()
        began = time.perf_counter()
        await backend.embeddings(MODEL, {"input": "warm-up"})
        load = time.perf_counter() - began
        print(f"{kind:8} first request (load) {load:.2f} s, +{rss_mb() - rss:.0f} MB resident")

        def embed(texts: list[str], backend: LocalBackend = backend) -> list[list[float]]:
            request = backend.embeddings(MODEL, {"input": texts})
            answer = asyncio.run_coroutine_threadsafe(request, loop).result()
            return [d["embedding"] for d in answer["data"]]

        await asyncio.to_thread(score, kind, embed)
        await backend.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--embeddings-quality",
        action="store_true",
        help="compare the GGUF's embeddings with all-MiniLM-L6-v2 instead of timing generation",
    )
    options = parser.parse_args()
    if options.embeddings_quality:
        asyncio.run(embeddings_quality(options.threads))
    else:
        asyncio.run(main(options))
