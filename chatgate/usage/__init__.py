"""Usage: one durable record per request, rollups, reports.

- :mod:`~chatgate.usage.record` — :class:`UsageRecord`, filled on the request path.
- :mod:`~chatgate.usage.recorder` — :class:`UsageRecorder`: queue, batched writes, spool, replay.
- :mod:`~chatgate.usage.batch` — the SQL of one batch (records once, rollups in the same
  transaction).
- :mod:`~chatgate.usage.spool` — the local spool for a database outage.
- :mod:`~chatgate.usage.tables` — ``usage_records`` and ``usage_rollups``.
- :mod:`~chatgate.usage.queries` — reports from the rollups; the raw export.
- :mod:`~chatgate.usage.cli` — ``chatgate usage`` and ``chatgate usage export``.
"""

from __future__ import annotations

from chatgate.usage import tables as _tables  # registers the tables on the shared metadata
from chatgate.usage.record import UsageRecord
from chatgate.usage.recorder import UsageRecorder

__all__ = ["UsageRecord", "UsageRecorder"]

del _tables
