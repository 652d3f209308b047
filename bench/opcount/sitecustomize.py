"""Bytecodes per function, for bench/opcodes.py: imported by a gateway started with this folder
on ``PYTHONPATH`` and ``OPCOUNT_OUT`` set. SIGUSR1 starts counting (every opcode of every frame
of the main thread), SIGUSR2 stops and writes ``count<TAB>calls<TAB>file:line:function`` rows,
most first. Counting slows the process ~50x: only for a measured window of a few hundred
requests, never in production."""

from __future__ import annotations

import collections
import os
import signal
import sys
from types import CodeType, FrameType
from typing import Any

if os.environ.get("OPCOUNT_OUT"):
    _counts: collections.Counter[CodeType] = collections.Counter()
    _calls: collections.Counter[CodeType] = collections.Counter()

    def _local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            _counts[frame.f_code] += 1
        return _local

    def _global(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        _calls[frame.f_code] += 1  # a call, or a coroutine resumed
        return _local

    def _start(signum: int, frame: FrameType | None) -> None:
        _counts.clear()
        _calls.clear()
        sys.settrace(_global)
        while frame is not None:  # the frames already running (the event loop's)
            frame.f_trace = _local
            frame.f_trace_opcodes = True
            frame = frame.f_back

    def _stop(signum: int, frame: FrameType | None) -> None:
        sys.settrace(None)
        with open(os.environ["OPCOUNT_OUT"], "w") as out:
            for code, n in _counts.most_common():
                where = f"{code.co_filename}:{code.co_firstlineno}:{code.co_qualname}"
                out.write(f"{n}\t{_calls[code]}\t{where}\n")

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
