"""``chatgate scan`` and scheduled rotation (``keys create --rotate-every``, ``keys due``),
through the real CLI against a running server's storage."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from chatgate.keys import format as keyfmt
from tests.helpers import Gateway
from tests.security.conftest import CHAT, call, new_account, new_key


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    env.update(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    subprocess.run(["git", "-C", str(repo), *args], env=env, check=True, capture_output=True)


def wait_status(gw: Gateway, key: str, status: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = call(gw, "POST", "/v1/chat/completions", key, json=CHAT).status_code
        if got == status or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_scan_finds_reports_hints_and_revokes(sec: Gateway, tmp_path: Path) -> None:
    email = new_account(sec)
    in_history = new_key(sec, email)
    in_file = new_key(sec, email)
    bystander = new_key(sec, email)
    stranger = keyfmt.generate()  # well-formed, but no key of this server
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".env").write_text(f"OPENAI_API_KEY={in_history['key']}\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "oops")
    (repo / ".env").unlink()
    git(repo, "commit", "-qam", "remove the key")
    (repo / "notes.md").write_text(f"# notes\n\nuse {in_file['key']} or {stranger}\n")

    # Offline scan: exit 1, hints only, nothing revoked.
    found = sec.cli("scan", str(repo), "--git", check=False)
    assert found.returncode == 1, found.stderr
    for key in (in_history["key"], in_file["key"], stranger):
        assert key not in found.stdout + found.stderr
        assert keyfmt.hint(key) in found.stdout
    assert f"{repo / 'notes.md'}:3: {keyfmt.hint(in_file['key'])}" in found.stdout
    assert f" .env:1: {keyfmt.hint(in_history['key'])}" in found.stdout
    assert wait_status(sec, in_file["key"], 200) == 200

    revoke = sec.cli("scan", str(repo), "--git", "--revoke", "--json", check=False)
    assert revoke.returncode == 1, revoke.stderr
    for key in (in_history["key"], in_file["key"], stranger):
        assert key not in revoke.stdout + revoke.stderr
    report = json.loads(revoke.stdout)
    actions = {r["hint"]: r for r in report["revocations"]}
    assert actions[keyfmt.hint(in_history["key"])]["action"] == "revoked"
    assert actions[keyfmt.hint(in_file["key"])]["key_id"] == in_file["id"]
    assert actions[keyfmt.hint(in_file["key"])]["account_email"] == email
    assert actions[keyfmt.hint(stranger)] == {"hint": keyfmt.hint(stranger), "action": "unknown"}
    by_hint = {f["hint"]: f for f in report["findings"]}
    assert by_hint[keyfmt.hint(in_history["key"])]["commit"]
    assert by_hint[keyfmt.hint(in_file["key"])]["commit"] is None

    assert wait_status(sec, in_file["key"], 401) == 401
    assert wait_status(sec, in_history["key"], 401) == 401
    assert wait_status(sec, bystander["key"], 200) == 200  # only the leaked keys

    again = sec.cli("scan", str(repo), "--git", "--revoke", check=False)
    assert "was already revoked" in again.stdout


def test_scan_clean_tree_exits_0(sec: Gateway, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("sk-cg-" + "x" * 38 + "\n")
    result = sec.cli("scan", str(tmp_path))
    assert result.returncode == 0 and "no chatgate keys found" in result.stdout
    missing = sec.cli("scan", str(tmp_path / "missing"), check=False)
    assert missing.returncode == 2


def test_rotate_every_and_due(sec: Gateway) -> None:
    email = new_account(sec)
    soon = new_key(sec, email, "--rotate-every", "1s")
    later = new_key(sec, email, "--rotate-every", "90d")
    plain = new_key(sec, email)
    assert soon["rotation_period"] == 1 and later["rotation_period"] == 90 * 86400
    assert plain["rotation_period"] is None and plain["rotation_due"] is False
    time.sleep(2.1)
    due = sec.cli_json("keys", "due", "--account", email)
    assert [k["id"] for k in due] == [soon["id"]]
    assert due[0]["rotation_due"] is True and "key" not in due[0]
    table = sec.cli("keys", "due", "--account", email).stdout
    assert soon["id"] in table and soon["key"] not in table

    rotated = sec.cli_json("keys", "rotate", soon["id"], "--grace", "0")
    assert rotated["rotation_due_at"] == rotated["rotated_at"] + 1  # the clock restarts
    assert rotated["rotation_due_at"] > due[0]["rotation_due_at"]
    sec.cli("keys", "revoke", soon["id"])
    assert sec.cli_json("keys", "due", "--account", email) == []  # revoked: never due
    assert "no key is due" in sec.cli("keys", "due", "--account", email).stdout
    bad = sec.cli("keys", "create", "--account", email, "--rotate-every", "0", check=False)
    assert bad.returncode == 2 and "rotation period" in bad.stderr
