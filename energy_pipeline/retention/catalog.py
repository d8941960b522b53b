"""What the catalog says about the tables retention works on: day partitions in every state,
sizes, ownership, and how much of a partition is outside the visibility map."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime

import psycopg

from energy_pipeline.retention.plan import PartitionVacuum, RetentionError

_PARTITION_NAME = re.compile(r"^(?P<table>[a-z0-9_]+)_p(?P<day>\d{8})$")


@dataclass(frozen=True)
class DayPartition:
    """A table named `<parent>_pYYYYMMDD`: attached, half-detached, or left detached."""

    parent: str
    day: date
    attached: bool
    detach_pending: bool

    @property
    def name(self) -> str:
        return f"{self.parent}_p{self.day:%Y%m%d}"


_DAY_PARTITIONS = """
SELECT c.relname, i.inhrelid IS NOT NULL, coalesce(i.inhdetachpending, false)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
WHERE n.nspname = 'energy' AND c.relkind = 'r' AND c.relname ~ %s
"""


def day_partitions(conn: psycopg.Connection, table: str) -> list[DayPartition]:
    """Every day table of `energy.<table>`, detached leftovers of an interrupted run included."""
    rows = conn.execute(_DAY_PARTITIONS, (f"^{table}_p[0-9]{{8}}$",)).fetchall()
    out = []
    for name, attached, pending in rows:
        m = _PARTITION_NAME.match(name)
        if m:
            day = datetime.strptime(m["day"], "%Y%m%d").date()
            out.append(DayPartition(table, day, attached, pending))
    return sorted(out, key=lambda p: p.day)


def relation_bytes(conn: psycopg.Connection, names: Sequence[str]) -> int:
    """pg_total_relation_size summed over `energy.<name>` (absent ones count 0)."""
    row = conn.execute(
        "SELECT coalesce(sum(pg_total_relation_size(to_regclass('energy.' || quote_ident(n)))),"
        " 0)::bigint FROM unnest(%s::text[]) AS n",
        (list(names),),
    ).fetchone()
    return int(row[0]) if row else 0


def check_owner(conn: psycopg.Connection, table: str) -> None:
    row = conn.execute(
        "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class "
        "WHERE oid = %s::regclass",
        (f"energy.{table}",),
    ).fetchone()
    if not (row and row[0]):
        raise RetentionError(
            f"dropping partitions of energy.{table} needs its owner's rights: connect as a "
            "login that is a member of energy_owner (see docs/retention.md)"
        )


# n_ins_since_vacuum and n_mod_since_analyze count from the last vacuum and analyze of any kind
# (autovacuum's too); relpages and relallvisible are what the last vacuum or analyze found.
_VISIBILITY = """
SELECT c.relname, coalesce(s.n_ins_since_vacuum, 0), coalesce(s.n_mod_since_analyze, 0),
       c.relpages, c.relallvisible, pg_has_role(current_user, c.relowner, 'USAGE')
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE n.nspname = 'energy' AND c.relkind = 'r' AND c.relname = ANY(%s)
"""


def partition_visibility(
    conn: psycopg.Connection, parts: Sequence[DayPartition]
) -> list[PartitionVacuum]:
    """Rows changed since the last vacuum and analyze, and pages all-visible, of each of `parts`
    (those that exist), in the order given."""
    names = [p.name for p in parts]
    rows = {r[0]: r[1:] for r in conn.execute(_VISIBILITY, (names,)).fetchall()}
    out = []
    for p in parts:
        if p.name in rows:
            inserted, modified, pages, visible, owned = rows[p.name]
            out.append(
                PartitionVacuum(
                    p.parent, p.day, int(inserted), int(modified), int(pages), int(visible), owned
                )
            )
    return out
