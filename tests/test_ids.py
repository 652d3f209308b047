"""Random identifiers: format, uniqueness, and no bytes shared with a forked worker."""

from __future__ import annotations

import os
import re
import time

from chatgate.ids import new_id, ordered_id, random_hex


def test_format_and_uniqueness() -> None:
    ids = [new_id("req") for _ in range(10_000)]  # crosses several blocks of the buffer
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_ordered_ids_sort_by_the_time_they_were_made() -> None:
    before = int(time.time() * 1000)
    ids = [ordered_id("req") for _ in range(5_000)]
    after = int(time.time() * 1000)
    assert all(re.fullmatch(r"req_[0-9a-f]{28}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    stamps = [int(i[4:16], 16) for i in ids]
    assert before <= stamps[0] and stamps[-1] <= after
    assert stamps == sorted(stamps)  # ids of one millisecond differ in their random part
    assert len({i[16:] for i in ids}) == len(ids)


def test_a_request_larger_than_a_block() -> None:
    assert len(random_hex(5_000)) == 10_000
    assert len(random_hex(3)) == 6


def test_a_forked_child_never_repeats_the_parents_ids() -> None:
    new_id("req")  # the parent holds a block it has only begun
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then leave at once
        try:
            os.write(write_end, " ".join(new_id("req") for _ in range(50)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    mine = {new_id("req") for _ in range(50)}
    with os.fdopen(read_end, "rb") as pipe:
        theirs = set(pipe.read().decode().split())
    os.waitpid(pid, 0)
    assert len(theirs) == 50
    assert not mine & theirs
