"""``chatgate usage`` and ``chatgate usage export`` against real data on both databases.

The CLI's ``main`` runs in a worker thread (it calls ``asyncio.run`` itself), in process.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from chatgate.accounts import AccountStore
from chatgate.cli import main
from chatgate.keys.store import KeyStore
from chatgate.usage.record import UsageRecord
from chatgate.usage.recorder import UsageRecorder
from chatgate.usage.tables import DAY, HOUR
from tests.usage.factory import make_record, settings_for


@dataclass
class Data:
    email: str
    key_ids: list[str]
    records: list[UsageRecord]  # the account's records in the last 7 days
    older: list[UsageRecord]  # 10 to 20 days old: in a 30d export only


@pytest.fixture
async def data(
    engine: AsyncEngine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Data:
    monkeypatch.chdir(tmp_path)
    for name in ("CHATGATE_CONFIG", "CHATGATE_REDIS_URL", "CHATGATE_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHATGATE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CHATGATE_DATABASE_URL", database_url)
    monkeypatch.setenv("CHATGATE_LOCAL_MODEL", "0")
    settings = settings_for(database_url, tmp_path / "data")
    account = await AccountStore(engine).create(f"cli-{tmp_path.name[-10:]}@example.com".lower())
    keys = KeyStore(engine, settings.resolved_secret())
    k1, k2 = await keys.create(account.id, name="web"), await keys.create(account.id, name="etl")
    now = time.time()
    records = [
        make_record(
            account_id=account.id,
            key_id=(k1, k2)[i % 2].record.id,
            model=("gpt-test", "gpt-other")[i % 3 == 0],
            created_at=now - HOUR - i * 3 * HOUR,
            prompt_tokens=10 * i,
            completion_tokens=i,
            status=429 if i % 5 == 4 else 200,
            cost=0.5,
        )
        for i in range(40)  # 5 days back
    ]
    older = [
        make_record(account_id=account.id, key_id=k1.record.id, created_at=now - (10 + i) * DAY)
        for i in range(10)
    ]
    other = [make_record(account_id="acct_someone_else", created_at=now - HOUR)]
    recorder = UsageRecorder(engine, tmp_path / "spool")
    for rec in records + older + other:
        recorder.record(rec)
    await recorder.close()
    return Data(account.email, [k1.record.id, k2.record.id], records, older)


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_json_by_model_with_totals(data: Data, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run(
        capsys, "usage", "--account", data.email, "--by", "model", "--format", "json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert {row["model"] for row in report["data"]} == {"gpt-test", "gpt-other"}
    totals = report["totals"]
    assert totals["requests"] == len(data.records)
    assert totals["prompt_tokens"] == sum(r.prompt_tokens for r in data.records)
    assert totals["rate_limited"] == sum(r.status == 429 for r in data.records)
    assert totals["cost"] == pytest.approx(0.5 * len(data.records))
    assert sum(row["requests"] for row in report["data"]) == totals["requests"]


async def test_table_by_day_ends_with_totals(
    data: Data, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run(capsys, "usage", "--account", data.email, "--since", "7d")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("usage ") and data.email in lines[0]
    assert lines[1].split()[:3] == ["DAY", "REQUESTS", "ERRORS"]
    total = lines[-1].split()
    assert total[0] == "total" and int(total[1]) == len(data.records)
    # The title names what the rows are filtered to (a key's said "(all accounts)").
    code, out, err = await run(capsys, "usage", "--key", data.key_ids[1])
    title = out.strip().splitlines()[0]
    assert code == 0 and f"for key {data.key_ids[1]}" in title and "all accounts" not in title


async def test_csv_by_key_names_the_keys(data: Data, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run(
        capsys, "usage", "--account", data.email, "--by", "key", "--format", "csv"
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {(r["key_id"], r["name"]) for r in rows[:-1]} == {
        (data.key_ids[0], "web"),
        (data.key_ids[1], "etl"),
    }
    assert rows[-1]["key_id"] == "total"
    assert int(rows[-1]["requests"]) == len(data.records)
    code, out, _ = await run(
        capsys, "usage", "--key", data.key_ids[1], "--format", "json", "--since", "30d"
    )
    assert json.loads(out)["totals"]["requests"] == len(data.records) // 2


async def test_export_writes_raw_records(
    data: Data, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "usage.csv"
    code, out, err = await run(
        capsys, "usage", "export", "--account", data.email, "--output", str(target)
    )
    assert code == 0, err
    rows = list(csv.DictReader(target.open()))
    assert {r["request_id"] for r in rows} == {r.request_id for r in data.records + data.older}
    assert f"{len(rows)} usage records written" in out
    assert int(rows[0]["total_tokens"]) == int(rows[0]["prompt_tokens"]) + int(
        rows[0]["completion_tokens"]
    )
    assert rows[0]["time"].endswith("Z")
    code, out, err = await run(
        capsys, "usage", "export", "--since", "7d", "--account", data.email, "--output", "-"
    )
    assert code == 0, err
    assert len(list(csv.DictReader(io.StringIO(out)))) == len(data.records)


async def test_export_takes_the_options_given_before_it(
    data: Data, capsys: pytest.CaptureFixture[str]
) -> None:
    """QA: ``chatgate usage --account alice export`` exported every account's records (and
    ``--since``/``--key`` before ``export`` were dropped too): the options are ``usage``'s as
    well, and argparse took them there without a word."""

    async def exported(*argv: str) -> list[dict[str, str]]:
        code, out, err = await run(capsys, "usage", *argv)
        assert code == 0, err
        return list(csv.DictReader(io.StringIO(out)))

    before = await exported("--account", data.email, "--since", "7d", "export", "--output", "-")
    after = await exported("export", "--account", data.email, "--since", "7d", "--output", "-")
    assert len(before) == len(after) == len(data.records)
    assert {r["account_id"] for r in before} == {r.account_id for r in data.records}
    one_key = await exported("--key", data.key_ids[1], "export", "--output", "-")
    assert {r["key_id"] for r in one_key} == {data.key_ids[1]}
    assert one_key == await exported("export", "--key", data.key_ids[1], "--output", "-")


@pytest.mark.parametrize(
    "argv",
    [
        ("usage", "--since", "a while"),
        ("usage", "--account", "nobody@example.com"),
        ("usage", "export", "--since", "forever", "--output", "-"),
        ("usage", "--since", "1d", "export", "--since", "2d", "--output", "-"),
        ("usage", "export", "--key", "key_nothing", "--output", "-"),
    ],
)
async def test_errors_are_one_line_exit_2(
    data: Data, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]
) -> None:
    code, _, err = await run(capsys, *argv)
    assert code == 2
    assert err.startswith("chatgate: error: ") and err.count("\n") == 1


async def test_csv_cells_cannot_be_formulas(
    data: Data,
    engine: AsyncEngine,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # OWASP CSV injection: a spreadsheet runs a cell beginning with = + - @ as a formula.
    account = await AccountStore(engine).by_email(data.email)
    keys = KeyStore(engine, settings_for(database_url, tmp_path / "data").resolved_secret())
    key = await keys.create(account.id, name='=HYPERLINK("http://evil","x")')
    recorder = UsageRecorder(engine, tmp_path / "spool2")
    recorder.record(
        make_record(
            account_id=account.id,
            key_id=key.record.id,
            model="=cmd|' /C calc'!A0",
            conversation_id="+conv",
            error_code="@bad",
            created_at=time.time() - 60,
        )
    )
    await recorder.close()
    evil = ("=", "+", "-", "@")
    code, out, err = await run(
        capsys, "usage", "export", "--since", "1d", "--account", data.email, "--output", "-"
    )
    assert code == 0, err
    cells = [v for row in csv.DictReader(io.StringIO(out)) for v in row.values()]
    assert "'=cmd|' /C calc'!A0" in cells and "'+conv" in cells and "'@bad" in cells
    assert not [v for v in cells if v.startswith(evil)]
    for by, shown in (("key", '\'=HYPERLINK("http://evil","x")'), ("model", "'=cmd|")):
        code, out, err = await run(
            capsys, "usage", "--account", data.email, "--by", by, "--format", "csv"
        )
        assert code == 0, err
        cells = [v for row in csv.DictReader(io.StringIO(out)) for v in row.values()]
        assert not [v for v in cells if v.startswith(evil)], cells
        assert [v for v in cells if v.startswith(shown)], cells


async def test_the_table_shows_costs_as_the_dashboard_does(
    data: Data, capsys: pytest.CaptureFixture[str]
) -> None:
    """QA: the table printed ``0.0001`` where the dashboard said ``$0.0002`` (it rounds a
    spend up), and a real $0.0000132 as ``0.0000``. One formatting serves both now."""
    from chatgate.usage.tables import to_nanos, usd_text

    code, out, err = await run(capsys, "usage", "--account", data.email, "--since", "7d")
    assert code == 0, err
    total = out.strip().splitlines()[-1].split()
    assert usd_text(to_nanos(0.5 * len(data.records))) in total
    assert usd_text(to_nanos(0.0000132)) == "$0.0001"
