"""The leaked-key scanner (chatgate/keys/scan.py): files, binary files, real git history,
and no false positives on strings that only look like keys."""

from __future__ import annotations

import os
import random
import string
import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from chatgate.keys import format as keyfmt
from chatgate.keys.scan import (
    find_keys,
    group_by_key,
    parse_git_log,
    scan_git_history,
    scan_paths,
)

B62 = string.digits + string.ascii_letters


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True
    ).stdout


def lookalike(rng: random.Random) -> str:
    """Right prefix, length and alphabet, random checksum: almost surely not a key."""
    return "sk-cg-" + "".join(rng.choice(B62) for _ in range(38))


def test_finds_keys_by_format_and_checksum_only() -> None:
    rng = random.Random(7)
    real = keyfmt.generate()
    fakes = [lookalike(rng) for _ in range(2000)]
    assert not any(keyfmt.is_well_formed(f) for f in fakes)
    text = "\n".join([*fakes[:1000], f'API_KEY="{real}"', *fakes[1000:]]).encode()
    assert list(find_keys(text)) == [real]
    typo = real[:-1] + ("A" if real[-1] != "A" else "B")
    assert list(find_keys(typo.encode())) == []


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_random_bytes_give_nothing(data: bytes) -> None:
    assert list(find_keys(b"sk-cg-" + data)) == []


def test_files_folders_and_binary_files(tmp_path: Path) -> None:
    k1, k2 = keyfmt.generate(), keyfmt.generate()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "settings.py").write_text(f"# config\n\nKEY = '{k1}'  # oops\n")
    (tmp_path / "app.log").write_bytes(
        b"\xff\xfe binary \x00\n" * 3 + f"auth {k2} and {k1}\n".encode()
    )
    (tmp_path / "clean.txt").write_text("sk-cg-short and " + lookalike(random.Random(1)) + "\n")
    (tmp_path / ".git").mkdir()  # the history is scanned by --git, not as files
    (tmp_path / ".git" / "ORIG").write_text(k2)
    found = list(scan_paths([tmp_path]))
    where = sorted((Path(f.path).relative_to(tmp_path).as_posix(), f.line, f.hint) for f in found)
    assert where == sorted(
        [
            ("src/settings.py", 3, keyfmt.hint(k1)),
            ("app.log", 4, keyfmt.hint(k2)),
            ("app.log", 4, keyfmt.hint(k1)),
        ]
    )
    keys = group_by_key(found)
    assert sorted(k.hint for k in keys) == sorted([keyfmt.hint(k1), keyfmt.hint(k2)])
    assert {k.secret.reveal() for k in keys} == {k1, k2}
    for finding in found:  # the key never prints
        assert finding.secret.reveal() not in repr(finding) + str(finding.to_dict())


def test_missing_path_is_reported_not_fatal(tmp_path: Path) -> None:
    errors: list[str] = []
    key = keyfmt.generate()
    (tmp_path / "a.txt").write_text(key)
    found = list(scan_paths([tmp_path / "nope", tmp_path / "a.txt"], errors))
    assert [f.line for f in found] == [1]
    assert errors and "nope" in errors[0]


def test_git_history_finds_removed_keys_with_commit_and_line(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    leaked, later, branch_key = keyfmt.generate(), keyfmt.generate(), keyfmt.generate()
    (repo / "README").write_text("hello\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "first")
    (repo / "config.env").write_text(f"A=1\nB=2\nKEY={leaked}\n")
    # content that looks like diff headers must not confuse the parser
    (repo / "tricky.txt").write_text(f"++ b/fake\n@@ -1 +1 @@\n{later}\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "add config")
    first_leak = git(repo, "rev-parse", "HEAD").strip()
    (repo / "config.env").write_text("A=1\nB=2\n")  # "fixed": removed from the tree
    git(repo, "commit", "-qam", "remove key")
    git(repo, "checkout", "-qb", "side")
    (repo / "dir with space").mkdir()
    (repo / "dir with space" / "é.txt").write_text(f"x\n{branch_key}\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "on a branch")
    git(repo, "checkout", "-q", "main")

    assert [f.hint for f in scan_paths([repo / "config.env"])] == []  # tree is clean
    found = {(f.path, f.line, f.hint): f.commit for f in scan_git_history(repo / "README")}
    assert found[("config.env", 3, keyfmt.hint(leaked))] == first_leak
    assert ("tricky.txt", 3, keyfmt.hint(later)) in found
    assert ("dir with space/é.txt", 2, keyfmt.hint(branch_key)) in found  # --all: every ref
    assert len(found) == 3


def test_empty_repository_and_not_a_repository(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q")
    assert list(scan_git_history(tmp_path)) == []
    outside = tmp_path.parent / (tmp_path.name + "-plain")
    outside.mkdir()
    try:
        list(scan_git_history(outside))
    except Exception as exc:
        assert type(exc).__name__ == "GitError"
    else:  # pragma: no cover - only if /tmp itself were in a repository
        raise AssertionError("expected GitError")


def test_parse_git_log_counts_hunks() -> None:
    key = keyfmt.generate()
    log = [
        b"\x01commit abc\n",
        b"\n",
        b"diff --git a/f b/f\n",
        b"--- a/f\n",
        b"+++ b/f\n",
        b"@@ -10,2 +10,3 @@ context\n",
        b"-old\n",
        b"--- a/not-a-header\n",
        b"+new\n",
        b"++++ b/still-content\n",
        f"+{key}\n".encode(),
        b"@@ -40 +41 @@\n",
        f"+again {key}\n".encode(),
    ]
    found = [(f.path, f.line, f.commit) for f in parse_git_log(log)]
    assert found == [("f", 12, "abc"), ("f", 41, "abc")]
