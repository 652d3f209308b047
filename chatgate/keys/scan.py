"""Find chatgate keys in files and in a git repository's history.

A candidate is anything matching :data:`chatgate.keys.format.KEY_PATTERN`; it counts only when
its CRC32 checksum matches (:func:`chatgate.keys.format.is_well_formed`), so random strings of
the right shape are not reported (about one in 5.7e10 would pass by chance).

A :class:`Finding` carries the key's display hint for reports and keeps the key itself in a
:class:`~chatgate.settings.Secret` (it never prints), only so that ``--revoke`` can hash it.

- :func:`scan_paths` walks files and folders (``.git`` folders skipped: see history);
  binary files are scanned too, line by line, so a key in a log, a wheel or a SQLite file
  is found as well as one in source code.
- :func:`scan_git_history` reads ``git log -p --all`` (every commit reachable from any ref,
  stashes included) and reports each added line holding a key, with the commit and the line
  number in that commit's version of the file. A key removed later is still in the history,
  which is exactly why it must be revoked.
"""

from __future__ import annotations

import codecs
import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chatgate.keys import format as keyfmt
from chatgate.settings import Secret

__all__ = [
    "Finding",
    "GitError",
    "LeakedKey",
    "find_keys",
    "git_toplevel",
    "group_by_key",
    "parse_git_log",
    "scan_git_history",
    "scan_paths",
]

_PATTERN = re.compile(keyfmt.KEY_PATTERN.pattern.encode("ascii"))
_SKIP_DIRS = frozenset({".git", ".hg", ".svn"})
_HUNK = re.compile(rb"^@@ -\d+(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_COMMIT_MARK = b"\x01commit "


class GitError(Exception):
    """``git`` is missing, or the path is not a repository (message safe to print)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One place a well-formed key was found: ``path:line`` (and ``commit`` for history)."""

    path: str
    line: int
    hint: str
    secret: Secret = field(repr=False, compare=False)
    commit: str | None = None

    @property
    def location(self) -> str:
        """``path:line``, prefixed by the short commit for a finding in the history."""
        where = f"{self.path}:{self.line}"
        return f"{self.commit[:12]} {where}" if self.commit else where

    def to_dict(self) -> dict[str, Any]:
        """The finding for reports (``--json``): never the key, only its hint."""
        return {"path": self.path, "line": self.line, "commit": self.commit, "hint": self.hint}


def find_keys(data: bytes) -> Iterator[str]:
    """Every well-formed key (checksum included) in ``data``, in order."""
    for match in _PATTERN.finditer(data):
        candidate = match.group().decode("ascii")
        if keyfmt.is_well_formed(candidate):
            yield candidate


def _scan_lines(lines: Iterable[bytes], path: str) -> Iterator[Finding]:
    for number, line in enumerate(lines, 1):
        if b"sk-cg-" not in line:  # the cheap test first: most lines hold no candidate
            continue
        for key in find_keys(line):
            yield Finding(path, number, keyfmt.hint(key), Secret(key))


def scan_file(path: Path, display: str | None = None) -> Iterator[Finding]:
    """The keys in one file (read line by line, in binary: any size, any encoding)."""
    fh: IO[bytes]
    with open(path, "rb") as fh:
        yield from _scan_lines(fh, display if display is not None else str(path))


def _walk(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        yield root
        return
    for folder, dirs, files in os.walk(root):  # symlinked folders are not followed
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            path = Path(folder, name)
            if path.is_file():  # skips sockets, FIFOs and dangling links
                yield path


def scan_paths(paths: Iterable[str | Path], errors: list[str] | None = None) -> Iterator[Finding]:
    """The keys in ``paths`` (files, or folders walked recursively without ``.git``).

    A file that cannot be read is noted in ``errors`` (when given) and skipped.
    """
    for given in paths:
        root = Path(given)
        if not root.exists():
            if errors is not None:
                errors.append(f"{given}: no such file or directory")
            continue
        for path in _walk(root):
            try:
                yield from scan_file(path)
            except OSError as exc:
                if errors is not None:
                    errors.append(f"{path}: {exc.strerror or exc}")


def _git_path(raw: bytes) -> str:
    """The path of a ``+++ b/path`` header, unquoting git's C-style quoting."""
    text = raw.rstrip(b"\r\n")
    if text.endswith(b"\t"):  # git marks a name holding spaces with a trailing tab
        text = text[:-1]
    if text.startswith(b'"') and text.endswith(b'"'):
        text = codecs.escape_decode(text[1:-1])[0]
    decoded = text.decode("utf-8", errors="replace")
    return decoded[2:] if decoded.startswith("b/") else decoded


def parse_git_log(lines: Iterable[bytes]) -> Iterator[Finding]:
    """Findings in the output of ``git log -p -U0 --format=%x01commit %H`` (added lines).

    Hunk headers give the new file's line numbers and how many lines the hunk holds, so a
    content line that happens to look like a header is never mistaken for one.
    """
    commit: str | None = None
    path: str | None = None
    added_left = removed_left = 0
    line_no = 0
    for raw in lines:
        if added_left or removed_left:  # inside a hunk: only content lines
            if raw.startswith(b"+") and added_left:
                added_left -= 1
                if b"sk-cg-" in raw and path is not None:
                    for key in find_keys(raw[1:]):
                        yield Finding(path, line_no, keyfmt.hint(key), Secret(key), commit)
                line_no += 1
            elif raw.startswith(b"-") and removed_left:
                removed_left -= 1
            # "\ No newline at end of file" and anything else: not a counted line
            continue
        if raw.startswith(_COMMIT_MARK):
            commit = raw[len(_COMMIT_MARK) :].strip().decode("ascii", errors="replace")
            path = None
        elif raw.startswith(b"+++ "):
            target = raw[4:]
            path = None if target.rstrip() == b"/dev/null" else _git_path(target)
        elif raw.startswith(b"diff --git "):
            path = None
        else:
            hunk = _HUNK.match(raw)
            if hunk:
                removed_left = int(hunk.group(1)) if hunk.group(1) is not None else 1
                line_no = int(hunk.group(2))
                added_left = int(hunk.group(3)) if hunk.group(3) is not None else 1


def scan_git_history(repo: str | Path) -> Iterator[Finding]:
    """The keys added by any commit reachable from any ref of the repository holding ``repo``.

    Runs plain ``git`` (no library); binary files are diffed as text so that a key inside
    one is found too. Paths are reported relative to the repository's top folder.
    """
    top = git_toplevel(repo)
    if not _git(top, "for-each-ref", "--count=1").strip():
        return  # no commit yet: no history
    command = [
        "git",
        "-C",
        top,
        "-c",
        "core.quotePath=false",
        "log",
        "-p",
        "--all",
        "--no-color",
        "--no-ext-diff",
        "--no-textconv",
        "--text",
        "--unified=0",
        "--no-renames",
        "--format=%x01commit %H",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        yield from parse_git_log(proc.stdout)
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read() if proc.stderr else b""
        if proc.stderr:
            proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise GitError(f"git log failed in {top}: {stderr.decode(errors='replace').strip()}")


def git_toplevel(path: str | Path) -> str:
    """The top folder of the repository holding ``path`` (a file or a folder)."""
    folder = Path(path)
    if not folder.is_dir():
        folder = folder.parent
    return _git(folder, "rev-parse", "--show-toplevel").strip()


def _git(repo: str | Path, *args: str, check: bool = True) -> str:
    try:
        result = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        raise GitError("git is not installed (needed for --git)") from None
    if check and result.returncode != 0:
        detail = result.stderr.strip().splitlines()
        raise GitError(f"{repo}: {detail[0] if detail else 'not a git repository'}")
    return result.stdout


@dataclass(frozen=True, slots=True)
class LeakedKey:
    """One distinct key and every place it was found."""

    hint: str
    secret: Secret = field(repr=False)
    findings: tuple[Finding, ...]


def group_by_key(findings: Iterable[Finding]) -> list[LeakedKey]:
    """Findings grouped per distinct key, in order of first appearance."""
    groups: dict[str, list[Finding]] = {}
    for finding in findings:
        groups.setdefault(finding.secret.reveal(), []).append(finding)
    return [LeakedKey(found[0].hint, found[0].secret, tuple(found)) for found in groups.values()]
