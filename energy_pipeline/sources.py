"""What the minute rollup reads from InfluxDB, and proof that it read all of it.

A chunked CSV answer that a server limit (`max-select-point`, `query-timeout`) stops just ends:
the rows stop and nothing says so. So every window is read in two steps. InfluxDB first counts
`power_w` per minute (a small JSON answer, which does report limits); then the points are read
and counted again here. A read holding fewer values than InfluxDB counted is read again in
smaller pieces (half the minutes, then more series slices) and fails loudly when even one minute
read alone in the most slices comes back short. The count and sum of every field of the points
read are kept in the ledger, and the late-data check asks InfluxDB for them again later: a point
re-written with a corrected value changes a sum even when no count moves.

Fields are selected with an explicit type (`"power_w"::float`, `"power_w"::string`): a field
whose type differs between shards otherwise resolves to one type and silently loses the values of
the others. Tags are selected and filtered as tags (`"device_id"::tag`), so a *field* named
`device_id` cannot take the tag's place; it is read as a column of its own and quarantined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from energy_pipeline.influx import (
    MAX_SLICES,
    InfluxAnswerError,
    InfluxClient,
    InfluxError,
    InfluxLimitError,
    conform,
    quote_ident,
    series_slices,
    to_ns,
)
from energy_pipeline.schemas import (
    CHECKSUM_COLUMNS,
    CHECKSUM_SCHEMA,
    FIELDS,
    TAGS,
    extra_column,
)

MINUTE = timedelta(minutes=1)
NS_PER_MINUTE = 60_000_000_000
# Of two checksums this close, neither saw a different value: InfluxDB's float sums can differ in
# the last bits between two queries over the same points.
SUM_RELATIVE_TOLERANCE = 1e-9
# Halvings of a checksum window to find the minutes whose sum overflows (see column_counts): a
# 3-hour full scan narrows them to pieces of about 11 minutes in at most 46 queries.
UNENCODABLE_SPLITS = 4


class IncompleteReadError(InfluxError):
    """InfluxDB kept answering with fewer points than it counted for a minute."""


@dataclass(frozen=True)
class Column:
    """One typed field selection: `"power_w"::float AS "power_w"`."""

    field: str
    kind: str  # float (InfluxDB casts integers to it), string or boolean
    # A field stored as floats in every shard is selected as it is: the cast costs InfluxDB time
    # (about a tenth of a minute's read here) and changes nothing then. Integers are cast:
    # InfluxDB sums them as integers, which wrap around past 2**63, and the client sums floats.
    cast: bool = True
    # A field outside the contract, read only so that points carrying nothing else are seen.
    extra: bool = False

    @property
    def alias(self) -> str:
        if self.extra:
            return extra_column(self.field, self.kind)
        if self.kind == "float" and self.field in FIELDS:
            return self.field
        return f"{self.field}__{self.kind}"

    @property
    def expr(self) -> str:
        return quote_ident(self.field) + (f"::{self.kind}" if self.cast else "")

    @property
    def dtype(self) -> pl.DataType:
        return pl.Float64() if self.kind == "float" else pl.String()


def read_columns(
    field_types: Mapping[str, Iterable[str]], unread: Iterable[str] = ()
) -> list[Column]:
    """The typed columns to read, given the field types InfluxDB has seen (`SHOW FIELD KEYS`).

    Every main field is read as a number; its values stored as strings or booleans in some shard
    get a column of their own. Fields named like a tag get one column per type, and so do fields
    outside the contract: a point carrying only those must reach the contract, not vanish. They
    cost a read only where series carry them; fields in `unread` are skipped (see
    `ENERGY_UNREAD_FIELDS`).
    """
    kinds = {
        f: {"float" if t in ("float", "integer") else t for t in types}
        for f, types in field_types.items()
    }
    columns = []
    for f in FIELDS:
        only_floats = set(field_types.get(f, ())) <= {"float"}
        columns.append(Column(f, "float", cast=not only_floats))
        columns += [Column(f, k) for k in ("string", "boolean") if k in kinds.get(f, ())]
    for t in TAGS:
        columns += [Column(t, k) for k in ("float", "string", "boolean") if k in kinds.get(t, ())]
    for f in sorted(set(kinds) - set(FIELDS) - set(TAGS) - set(unread)):
        one_type = len(set(field_types[f])) <= 1
        columns += [Column(f, k, cast=not one_type, extra=True) for k in sorted(kinds[f])]
    return columns


def raw_schema(columns: Iterable[Column]) -> dict[str, pl.DataType]:
    """Schema of a raw read: time, tags, then one column per typed field."""
    return {
        "time": pl.Int64(),
        **{t: pl.String() for t in TAGS},
        **{c.alias: c.dtype for c in columns},
    }


def raw_points_query(measurement: str, columns: Iterable[Column], condition: str = "") -> str:
    """InfluxQL for every raw point in [$start, $end), typed fields and tags as columns.

    `GROUP BY device_id` returns the points device by device instead of merged into one time
    order across all series. InfluxDB then skips merging 5,000 series point by point: a 60-minute
    read of compacted history took half the time here, and a fresh minute was no slower.
    """
    columns = list(columns)
    # A field named like a tag takes the tag's place in SELECT unless the tag is cast as a tag.
    shadowed = any(c.field in TAGS for c in columns)
    tag = "::tag" if shadowed else ""
    selected = [f"{c.expr} AS {quote_ident(c.alias)}" for c in columns]
    selected += [f"{quote_ident(t)}{tag} AS {quote_ident(t)}" for t in TAGS]
    return (
        f"SELECT {', '.join(selected)} FROM {quote_ident(measurement)} "
        f'WHERE time >= $start AND time < $end{condition} GROUP BY "device_id"'
    )


def _count_alias(column: Column) -> str:
    return f"n__{column.alias}"


def _sum_alias(column: Column) -> str:
    return f"s__{column.alias}"


def _summed(column: Column) -> bool:
    return column.kind == "float" and column.field in FIELDS


def checksum_query(measurement: str, columns: Iterable[Column], sums: bool = True) -> str:
    """InfluxQL counting every typed column per minute, and summing the numeric main fields.

    Every aggregate costs InfluxDB a pass over its field's blocks: a sum doubles a count's cost.
    """
    parts = []
    for c in columns:
        parts.append(f"count({c.expr}) AS {quote_ident(_count_alias(c))}")
        if sums and _summed(c):
            parts.append(f"sum({c.expr}) AS {quote_ident(_sum_alias(c))}")
    return (
        f"SELECT {', '.join(parts)} FROM {quote_ident(measurement)} "
        "WHERE time >= $start AND time < $end GROUP BY time(1m)"
    )


def field_types(client: InfluxClient, measurement: str) -> dict[str, set[str]]:
    """Every type each field of `measurement` has in any shard (`SHOW FIELD KEYS`)."""
    out: dict[str, set[str]] = {}
    for result in client.query_json(f"SHOW FIELD KEYS FROM {quote_ident(measurement)}"):
        for series in result.get("series", []):
            for key, kind in series.get("values") or []:
                out.setdefault(key, set()).add(kind)
    return out


def _minutes(start: datetime, end: datetime) -> int:
    return int((end - start) / MINUTE)


def _halves(start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
    mid = start + (_minutes(start, end) // 2) * MINUTE
    return [(start, mid), (mid, end)]


def column_counts(
    client: InfluxClient,
    measurement: str,
    columns: list[Column],
    start: datetime,
    end: datetime,
    sums: bool = True,
    unencodable_splits: int = UNENCODABLE_SPLITS,
) -> pl.DataFrame:
    """InfluxDB's own count of every typed column (and sum of the numeric ones) per minute.

    Windows too large for a server limit are halved until they fit. A piece whose sums InfluxDB
    cannot encode gets them as null after at most `unencodable_splits` halvings.
    """
    aliases = [_count_alias(c) for c in columns]
    aliases += [_sum_alias(c) for c in columns if sums and _summed(c)]
    schema = {
        "time": pl.Int64(),
        **{a: pl.Int64() if a.startswith("n__") else pl.Float64() for a in aliases},
    }
    try:
        frame = client.query_json_frame(
            checksum_query(measurement, columns, sums),
            {"start": to_ns(start), "end": to_ns(end)},
            schema,
        )
    except InfluxLimitError as exc:
        if _minutes(start, end) <= 1:
            raise InfluxLimitError(
                f"InfluxDB cannot count the points of minute {start:%Y-%m-%d %H:%M} within its "
                f"limits ({exc}); raise max-select-point / query-timeout on the server"
            ) from exc
        halves = _halves(start, end)
        return pl.concat(
            [
                column_counts(
                    client,
                    measurement,
                    columns,
                    *w,
                    sums=sums,
                    unencodable_splits=unencodable_splits,
                )
                for w in halves
            ]
        )
    except InfluxAnswerError:
        # A sum past the float range (+Inf) cannot be sent as JSON. Narrow it down a few
        # halvings (a device that keeps sending such values must not cost a query per minute),
        # then leave that piece's sums unknown (null): counts still prove late points.
        if not sums:
            raise
        if _minutes(start, end) <= 1 or unencodable_splits <= 0:
            counted = column_counts(client, measurement, columns, start, end, sums=False)
            return counted.with_columns(
                pl.lit(None, pl.Float64()).alias(a) for a in aliases if a.startswith("s__")
            ).select(list(schema))
        return pl.concat(
            [
                column_counts(client, measurement, columns, *w,
                              unencodable_splits=unencodable_splits - 1)
                for w in _halves(start, end)
            ]
        )  # fmt: skip
    return frame.with_columns(
        pl.col(a).fill_null(0) for a in aliases if a.startswith("n__")
    ).with_columns(pl.col(a).fill_null(0.0) for a in aliases if a.startswith("s__"))


def checksums(counts: pl.DataFrame, columns: Iterable[Column]) -> pl.DataFrame:
    """Per-minute checksums from InfluxDB's answer: count of each main field (all its types)
    and sum of its numeric values."""
    columns = list(columns)
    exprs = []
    for f in FIELDS:
        typed = [_count_alias(c) for c in columns if c.field == f]
        n = pl.sum_horizontal(typed) if typed else pl.lit(0)
        total = _sum_alias(Column(f, "float"))
        value = pl.col(total) if total in counts.columns else pl.lit(0.0)
        exprs += [n.cast(pl.Int64).alias(f"{f}_points"), value.alias(f"{f}_sum")]
    return counts.select(_bucket_from_ns(), *exprs).sort("bucket")


def read_checksums(points: pl.DataFrame, columns: Iterable[Column]) -> pl.DataFrame:
    """The same checksums computed from the points read (what the rollup was built from).

    A float sum taken in another order than InfluxDB's differs only in the last bits, which the
    comparison tolerates.
    """
    counted = _client_counts(points, list(columns)).join(
        points.group_by(_minute_of("time")).agg(
            pl.col(f).sum().alias(_sum_alias(Column(f, "float"))) for f in FIELDS
        ),
        on="time",
        how="left",
    )
    return checksums(counted, columns)


def _minute_of(column: str) -> pl.Expr:
    return (pl.col(column) // NS_PER_MINUTE * NS_PER_MINUTE).alias(column)


def _bucket_from_ns() -> pl.Expr:
    ns = pl.from_epoch("time", "ns").dt.replace_time_zone("UTC")
    return ns.cast(CHECKSUM_SCHEMA["bucket"]).alias("bucket")


def checksums_differ(left: pl.Expr, right: pl.Expr, is_sum: bool) -> pl.Expr:
    """True where two checksum values say the points differ.

    A sum that is unknown (null: InfluxDB could not encode it) or infinite (the client's sum
    overflowed) is no evidence either way; the counts beside it still are.
    """
    if not is_sum:
        return left != right
    scale = pl.max_horizontal(left.abs(), right.abs(), pl.lit(1.0))
    differ = (
        left.is_finite()
        & right.is_finite()
        & ((left - right).abs() > scale * SUM_RELATIVE_TOLERANCE)
    )
    return differ.fill_null(False)


def _client_counts(frame: pl.DataFrame, columns: list[Column]) -> pl.DataFrame:
    """What a read holds: non-null values of every typed column per minute."""
    return frame.group_by(_minute_of("time")).agg(
        pl.col(c.alias).is_not_null().sum().cast(pl.Int64).alias(_count_alias(c)) for c in columns
    )


def shortfall(frame: pl.DataFrame, counts: pl.DataFrame, columns: list[Column]) -> pl.DataFrame:
    """Minutes where the read holds fewer values of some column than InfluxDB counted.

    More values than counted is fine: points written after the count (the ledger keeps the
    older checksum, so the late-data check recomputes that minute).
    """
    got = _client_counts(frame, columns)
    joined = counts.join(got, on="time", how="left", suffix="_read")
    short = pl.any_horizontal(
        pl.col(f"{_count_alias(c)}_read").fill_null(0) < pl.col(_count_alias(c)) for c in columns
    )
    missing = pl.sum_horizontal(
        (pl.col(_count_alias(c)) - pl.col(f"{_count_alias(c)}_read").fill_null(0)).clip(0)
        for c in columns
    )
    return joined.filter(short).select("time", missing.alias("missing"))


@dataclass
class WindowRead:
    """The raw points of a window, their per-minute checksums, and how many queries it took."""

    points: pl.DataFrame
    checksums: pl.DataFrame
    queries: int


def read_window(
    client: InfluxClient,
    measurement: str,
    start: datetime,
    end: datetime,
    parallel: int = 1,
    unread: Iterable[str] = (),
) -> WindowRead:
    """Every raw point of `measurement` in [start, end), verified against InfluxDB's counts;
    fields outside the contract named in `unread` are not read.

    Raises IncompleteReadError when InfluxDB keeps answering short for a minute.
    """
    columns = read_columns(field_types(client, measurement), unread)
    # Every aggregate is a pass over its field's blocks, so the proof of completeness counts
    # one field: a cut-short answer misses whole rows. Typed columns beyond the plain numbers
    # (type drift, fields named like tags, fields outside the contract) are rare and counted too,
    # except text outside the contract: CSV reads an empty string as missing, and only for the
    # contract's fields is a minute worth reading as JSON.
    checked = [
        c
        for c in columns
        if (c.alias != c.field or c.field == FIELDS[0]) and not (c.extra and c.kind == "string")
    ]
    counts = column_counts(client, measurement, checked, start, end, sums=False)
    # JSON tells an empty string from a missing value; CSV cannot. Only minutes holding
    # non-numeric values of a field pay for it, one minute at a time (JSON costs memory).
    other = [_count_alias(c) for c in checked if c.kind != "float" and not c.extra]
    as_json = set(counts.filter(pl.sum_horizontal(other) > 0)["time"].to_list()) if other else set()
    reader = _Reader(client, measurement, columns, checked, counts, as_json)
    points = reader.read(start, end, max(1, parallel))
    return WindowRead(points, read_checksums(points, columns), reader.queries)


@dataclass
class _Reader:
    client: InfluxClient
    measurement: str
    columns: list[Column]
    checked: list[Column]  # the columns `counts` holds
    counts: pl.DataFrame
    as_json: set[int]  # minutes (ns) to read as JSON
    queries: int = 0

    def read(self, start: datetime, end: datetime, parallel: int) -> pl.DataFrame:
        json_minutes = {m for m in self.as_json if to_ns(start) <= m < to_ns(end)}
        if json_minutes and _minutes(start, end) > 1:
            return pl.concat([self.read(s, e, parallel) for s, e in _halves(start, end)])
        frame = self._query(start, end, parallel, as_json=bool(json_minutes))
        window = self.counts.filter(
            pl.col("time").is_between(to_ns(start), to_ns(end), closed="left")
        )
        short = shortfall(frame, window, self.checked)
        if short.is_empty():
            return frame
        if _minutes(start, end) > 1:
            return pl.concat([self.read(s, e, parallel) for s, e in _halves(start, end)])
        if parallel < MAX_SLICES:
            return self.read(start, end, min(MAX_SLICES, parallel * 2))
        raise IncompleteReadError(
            f"InfluxDB kept answering {int(short['missing'].sum())} values short for minute "
            f"{start:%Y-%m-%d %H:%M}, even read alone in {parallel} slices: a server limit "
            "(max-select-point, query-timeout, max-row-limit) is cutting answers short; raise it "
            "on the server"
        )

    def _query(self, start: datetime, end: datetime, parallel: int, as_json: bool) -> pl.DataFrame:
        params = {"start": to_ns(start), "end": to_ns(end)}
        schema = raw_schema(self.columns)
        queries = [
            raw_points_query(self.measurement, self.columns, c) for c in series_slices(parallel)
        ]
        self.queries += len(queries)

        def one(q: str) -> pl.DataFrame:
            try:
                if as_json:
                    return self.client.query_json_frame(q, params, schema)
                return self.client.query_frame(q, params, schema)
            except InfluxLimitError:
                # Stopped by a limit and said so: an empty piece, which the counts catch.
                return pl.DataFrame(schema=schema)

        if len(queries) == 1:
            frames = [one(queries[0])]
        else:
            with ThreadPoolExecutor(len(queries), thread_name_prefix="influx-slice") as pool:
                frames = list(pool.map(one, queries))
        # No rechunk: the caller only filters and groups, and a copy of the window costs memory.
        return pl.concat([conform(f, schema) for f in frames], rechunk=False)


@dataclass(frozen=True)
class RawSource:
    """Where raw points come from: a measurement of an InfluxDB database, read in slices."""

    client: InfluxClient
    measurement: str
    parallel: int = 1
    # Fields outside the contract the read skips (`ENERGY_UNREAD_FIELDS`).
    unread: tuple[str, ...] = ()

    def read(self, start: datetime, end: datetime) -> WindowRead:
        """Every raw point in [start, end), verified complete (see `read_window`)."""
        return read_window(self.client, self.measurement, start, end, self.parallel, self.unread)

    def checksums(self, start: datetime, end: datetime) -> pl.DataFrame:
        """InfluxDB's checksums of every minute in [start, end) as they are now."""
        return current_checksums(self.client, self.measurement, start, end)

    def counts(self, start: datetime, end: datetime) -> pl.DataFrame:
        """InfluxDB's counts of the main fields per minute in [start, end) (see COUNTED)."""
        return current_counts(self.client, self.measurement, start, end)

    def out_of_range(self, before: datetime, after: datetime) -> dict[str, int]:
        """Points older than `before` or newer than `after` (see `out_of_range_counts`)."""
        return out_of_range_counts(self.client, self.measurement, before, after)


def late_minutes(
    current: pl.DataFrame, ledger: pl.DataFrame, compared: tuple[str, ...] = CHECKSUM_COLUMNS
) -> pl.DataFrame:
    """Minutes whose checksums in InfluxDB now differ from those their rollup was built from.

    `current` is `checksums()` over a window (or `counts()`, comparing only `COUNTED`); `ledger`
    holds the stored checksums and `late_points_ignored`. Returns bucket, extra_points (count
    difference, at least 1 when only values changed) and late_points_ignored, oldest first.
    """
    # A minute missing from `current` holds nothing now: zero points, zero sums. A null sum of
    # a minute it holds is unknown and stays null.
    seen = current.with_columns(pl.lit(True).alias("seen_now"))
    joined = ledger.join(seen, on="bucket", how="left", suffix="_now").with_columns(
        pl.when(pl.col("seen_now")).then(pl.col(f"{c}_now")).otherwise(0).alias(f"{c}_now")
        for c in compared
    )
    changed = pl.any_horizontal(
        checksums_differ(pl.col(f"{c}_now"), pl.col(c), c.endswith("_sum")) for c in compared
    )
    extra = pl.max_horizontal(
        (pl.col(f"{c}_now") - pl.col(c)).abs() for c in compared if c.endswith("_points")
    )
    return (
        joined.filter(changed)
        .with_columns(pl.max_horizontal(extra, pl.lit(1)).cast(pl.Int64).alias("extra_points"))
        .select("bucket", "extra_points", "late_points_ignored")
        .sort("bucket")
    )


# The cheap check: new points of the two main fields, as the late-data check always compared.
COUNTED = ("power_w_points", "energy_wh_points")


def current_counts(
    client: InfluxClient, measurement: str, start: datetime, end: datetime
) -> pl.DataFrame:
    """InfluxDB's count of `power_w` and `energy_wh` (all their types) per minute, as now.

    Two aggregates instead of the checksums' six: it sees late points, not corrected values.
    """
    columns = [c for c in read_columns(field_types(client, measurement)) if c.field in FIELDS[:2]]
    counts = column_counts(client, measurement, columns, start, end, sums=False)
    return checksums(counts, columns).select("bucket", *COUNTED)


def current_checksums(
    client: InfluxClient, measurement: str, start: datetime, end: datetime
) -> pl.DataFrame:
    """InfluxDB's checksums of every minute in [start, end) as they are now."""
    columns = [c for c in read_columns(field_types(client, measurement)) if not c.extra]
    return checksums(column_counts(client, measurement, columns, start, end), columns)


def out_of_range_counts(
    client: InfluxClient, measurement: str, before: datetime, after: datetime
) -> dict[str, int]:
    """Points no minute partition will ever read: older than `before`, or newer than `after`.

    InfluxDB accepts timestamps from 1677 to 2262; a device with a wrong clock writes points
    that are stored but never rolled up. Counted per side as values of the main fields.
    """
    columns = [Column(f, "float") for f in FIELDS]
    counts = ", ".join(f"count({c.expr}) AS {quote_ident(c.alias)}" for c in columns)
    out = {}
    for side, condition, bound in (("before", "time < $t", before), ("after", "time >= $t", after)):
        frame = client.query_json_frame(
            f"SELECT {counts} FROM {quote_ident(measurement)} WHERE {condition}",
            {"t": to_ns(bound)},
            {c.alias: pl.Int64() for c in columns},
        )
        out[side] = int(frame.select(pl.sum_horizontal(pl.all()).sum()).item() or 0)
    return out
