"""InfluxDB v1 HTTP API client: InfluxQL reads straight into Polars, line-protocol writes.

The v1 API (`/query`, `/write`) is served by InfluxDB 1.x, by 2.x through its
database/retention-policy mapping, and by 3.x. Values reach InfluxQL only as bound parameters
(`$name`); identifiers are quoted.
"""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import backoff
import polars as pl
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry


class InfluxError(RuntimeError):
    """InfluxDB could not be reached, refused the request, or answered with an error."""


class InfluxLimitError(InfluxError):
    """A server limit (`max-select-point`, `query-timeout`, `max-row-limit`) stopped the query:
    ask for less."""


class InfluxAnswerError(InfluxError):
    """InfluxDB answered a query with text that is not JSON, e.g. a sum it could not encode."""


# Statement errors that say the server was busy, not that the query was wrong: asked again.
_BUSY_ERRORS = ("max-concurrent-queries limit exceeded",)
# Statement errors that say the query asked for too much at once.
_LIMIT_ERRORS = (
    "max-select-point limit",
    "max-series limit",
    "query-timeout limit exceeded",
    "max-row-limit",
)
# How long a query turned away at `max-concurrent-queries` is asked again: well inside a sensor
# tick's 60 s, so a busy server fails a tick with a clear error instead of a timeout.
BUSY_WAIT_S = 30.0
# Rows per chunk of a JSON answer. Chunked answers are not cut at `[http] max-row-limit`.
JSON_CHUNK_ROWS = 10_000


def statement_error(message: str) -> InfluxError:
    """The exception for an InfluxQL statement error, by what the caller should do about it."""
    if any(e in message for e in _LIMIT_ERRORS):
        return InfluxLimitError(f"InfluxDB stopped the query at a server limit: {message}")
    return InfluxError(f"InfluxQL error: {message}")


def query_results(body: str) -> list[dict[str, Any]]:
    """The `results` of a `/query` answer, its chunks merged by statement; raises on any error.

    A chunked answer is one JSON document per line; a statement's series may span several.
    """
    results: dict[int, dict[str, Any]] = {}
    partial: dict[int, bool] = {}
    errors = []
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            chunk = json.loads(line)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            # InfluxDB 1.x answers 200 with its encoder's message in place of a chunk it
            # cannot encode: "json: unsupported value: +Inf" for a sum past the float range.
            raise InfluxAnswerError(f"InfluxDB answered with something not JSON: {line[:300]!r}")
        if "error" in chunk:
            errors.append(chunk["error"])
        for result in chunk.get("results", []):
            if "error" in result:
                errors.append(result["error"])
            key = result.get("statement_id", 0)
            merged = results.setdefault(key, {"statement_id": key, "series": []})
            merged["series"] += result.get("series", [])
            # Every chunk but a statement's last says "partial". One that still says so at the
            # end was cut by the server: a non-chunked answer past `[http] max-row-limit`.
            partial[key] = bool(result.get("partial")) or any(
                s.get("partial") for s in result.get("series", [])
            )
    if any(partial.values()):
        errors.append(
            "the answer was cut short (partial): raise or unset [http] max-row-limit on the server"
        )
    if errors:
        raise statement_error(errors[0])
    return list(results.values())


class _Transient(Exception):
    """A failure worth retrying: no connection, a dropped connection, or a 5xx answer."""


class _Busy(Exception):
    """The server turned the query away at `max-concurrent-queries`: asked again until a slot
    frees, for up to BUSY_WAIT_S, however many queries compete for it."""


def quote_ident(name: str) -> str:
    """Quote an InfluxQL identifier (measurement, retention policy, database)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_ns(ts: datetime) -> int:
    """Nanoseconds since the epoch for an aware datetime."""
    if ts.tzinfo is None:
        raise ValueError(f"naive datetime {ts!r}: pass a timezone-aware time (UTC)")
    return int(ts.timestamp()) * 1_000_000_000 + ts.microsecond * 1_000


MAX_SLICES = 10


def series_slices(parts: int) -> list[str]:
    """InfluxQL conditions that split the series into `parts` disjoint sets covering all of them.

    InfluxDB streams one query's series on one core; splitting by the last character of
    `device_id` lets concurrent queries use more. The last slice is the complement of the others,
    so ids of any shape (and points without the tag) land in exactly one slice. `::tag` keeps a
    *field* that happens to be called `device_id` from taking the tag's place.
    """
    if parts <= 1:
        return [""]
    parts = min(parts, MAX_SLICES)  # one class per last digit at most
    digits = "0123456789"
    per = len(digits) // parts
    classes = [digits[i * per : (i + 1) * per] for i in range(parts - 1)]
    covered = "".join(classes)
    return [
        *(f' AND "device_id"::tag =~ /[{c}]$/' for c in classes),
        f' AND "device_id"::tag !~ /[{covered}]$/',
    ]


def conform(frame: pl.DataFrame, schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Exactly the schema's columns, in its order; absent ones (a field never written) are null."""
    return frame.with_columns(
        pl.lit(None, dtype).alias(c) for c, dtype in schema.items() if c not in frame.columns
    ).select(list(schema))


class InfluxClient:
    """A small client for InfluxDB's v1 HTTP API with timeouts and retries."""

    def __init__(
        self,
        url: str,
        database: str,
        *,
        retention_policy: str | None = None,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            # Not echoed: a malformed URL may still carry a password.
            raise InfluxError("InfluxDB URL must start with http:// or https://")
        if not database:
            raise InfluxError("InfluxDB database name is empty")
        parts = urllib.parse.urlsplit(url)
        if "@" in parts.netloc:
            # Userinfo (http://user:pass@host) is basic auth unless a token or username is given;
            # it leaves the URL, which errors and repr() show and http.client would not send.
            if not token and not username:
                username = urllib.parse.unquote(parts.username or "")
                password = urllib.parse.unquote(parts.password or "")
            url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        self.url = url.rstrip("/")
        self._target = urllib.parse.urlsplit(self.url)
        self.database = database
        self.retries = retries
        self.backoff_s = backoff_s
        self.retention_policy = retention_policy or None
        self.timeout_s = timeout_s
        self.session = requests.Session()
        # Retries cover refused connections and 5xx answers; InfluxQL SELECTs and line-protocol
        # writes are both safe to repeat (a rewritten point replaces itself).
        retry = Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=backoff_s,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=frozenset({"GET", "POST"}),
            raise_on_status=False,
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self._auth: dict[str, str] = {}
        if token:
            # InfluxDB 2.x/3.x v1-compatibility endpoints take the API token this way.
            self._auth["Authorization"] = f"Token {token}"
        elif username:
            basic = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self._auth["Authorization"] = f"Basic {basic}"
        self.session.headers.update(self._auth)

    def __repr__(self) -> str:  # never shows credentials
        return f"InfluxClient(url={self.url!r}, database={self.database!r})"

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            resp = self.session.request(
                method, f"{self.url}{path}", timeout=self.timeout_s, **kwargs
            )
        except requests.exceptions.RetryError as exc:
            raise InfluxError(f"InfluxDB at {self.url} kept failing ({exc})") from exc
        except requests.ConnectionError as exc:
            raise InfluxError(f"cannot reach InfluxDB at {self.url}: {exc}") from exc
        except requests.Timeout as exc:
            raise InfluxError(
                f"InfluxDB at {self.url} did not answer within {self.timeout_s}s"
            ) from exc
        self._check(path, resp.status_code, resp.headers.get("X-Influxdb-Error") or resp.text)
        return resp

    def _check(self, path: str, status: int, detail: str) -> None:
        if status in (401, 403):
            raise InfluxError(
                f"InfluxDB at {self.url} refused the credentials (HTTP {status}): "
                "check INFLUXDB_TOKEN or INFLUXDB_USERNAME/INFLUXDB_PASSWORD"
            )
        if status >= 400:
            raise InfluxError(f"InfluxDB {path} failed (HTTP {status}): {detail[:500]}")

    def _post_csv(self, form: dict[str, str]) -> bytes:
        """POST a query asking for CSV and return the body.

        Bulk reads bypass `requests`: its chunked-transfer decoding cost ~0.3 s per 20 MB minute
        here, while http.client reads the same answer at close to curl's speed. Retries (connection
        errors and 5xx, exponential backoff) come from `backoff`.
        """
        target = self._target
        conn_cls = (
            http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        )
        path = f"{target.path}/query"
        headers = {
            "Accept": "application/csv",
            "Content-Type": "application/x-www-form-urlencoded",
            **self._auth,
        }

        @backoff.on_exception(
            backoff.expo, _Transient, max_tries=self.retries + 1, factor=self.backoff_s,
            logger=None,
        )  # fmt: skip
        def attempt() -> tuple[int, str, bytes]:
            conn = conn_cls(target.hostname or "", target.port, timeout=self.timeout_s)
            try:
                conn.request("POST", path, body=urllib.parse.urlencode(form), headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise _Transient(f"cannot reach InfluxDB at {self.url}: {exc}") from exc
            finally:
                conn.close()
            if resp.status >= 500:
                raise _Transient(f"InfluxDB at {self.url} kept failing (HTTP {resp.status})")
            return (
                resp.status,
                resp.getheader("X-Influxdb-Error") or body.decode(errors="replace"),
                body,
            )

        try:
            status, detail, body = attempt()
        except _Transient as exc:
            raise InfluxError(str(exc)) from exc
        self._check("/query", status, detail)
        return body

    def _query_params(self, q: str, params: Mapping[str, Any] | None) -> dict[str, str]:
        out = {"db": self.database, "q": q, "epoch": "ns"}
        if self.retention_policy:
            out["rp"] = self.retention_policy
        if params:
            out["params"] = json.dumps(dict(params))
        return out

    def ping(self) -> str:
        """Return the server's version; raises InfluxError when unreachable."""
        resp = self._request("GET", "/ping")
        return resp.headers.get("X-Influxdb-Version", "unknown")

    def query_json(self, q: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run InfluxQL and return its `results` list, raising on any statement error.

        A server busy at `max-concurrent-queries` is asked again with backoff for up to
        `BUSY_WAIT_S`; a query stopped by `max-select-point`, `query-timeout` or
        `max-row-limit` raises `InfluxLimitError` (the caller asks for less); an answer that is
        not JSON raises `InfluxAnswerError`.
        """

        @backoff.on_exception(
            backoff.expo, _Transient, max_tries=self.retries + 1, factor=self.backoff_s,
            logger=None,
        )  # fmt: skip
        @backoff.on_exception(
            backoff.expo, _Busy, max_time=min(self.timeout_s, BUSY_WAIT_S), factor=self.backoff_s,
            max_value=2.0, logger=None,
        )  # fmt: skip
        def attempt() -> list[dict[str, Any]]:
            form = self._query_params(q, params)
            form |= {"chunked": "true", "chunk_size": str(JSON_CHUNK_ROWS)}
            resp = self._request("POST", "/query", data=form)
            try:
                return query_results(resp.text)
            except InfluxError as exc:
                if any(busy in str(exc) for busy in _BUSY_ERRORS):
                    raise _Busy(f"InfluxDB at {self.url} stayed busy: {exc}") from exc
                raise

        try:
            return attempt()
        except (_Transient, _Busy) as exc:
            raise InfluxError(str(exc)) from exc

    def query_json_frame(
        self, q: str, params: Mapping[str, Any] | None, schema: Mapping[str, pl.DataType]
    ) -> pl.DataFrame:
        """Run InfluxQL as JSON and return its rows as a frame of `schema` (tags become columns).

        Slower than CSV for bulk reads, but JSON tells an empty string from a missing value and
        reports every statement error, where a CSV answer is silent.
        """
        frames = []
        for result in self.query_json(q, params):
            for series in result.get("series", []):
                columns = series["columns"]
                rows = series.get("values") or []
                data = {c: [row[i] for row in rows] for i, c in enumerate(columns) if c in schema}
                for tag, value in (series.get("tags") or {}).items():
                    if tag in schema and tag not in data:
                        data[tag] = [value] * len(rows)
                frame = pl.DataFrame(
                    {c: pl.Series(c, v, dtype=schema[c], strict=False) for c, v in data.items()}
                )
                frames.append(conform(frame, schema))
        if not frames:
            return pl.DataFrame(schema=dict(schema))
        return pl.concat(frames)

    def query_frame(
        self,
        q: str,
        params: Mapping[str, Any] | None = None,
        schema: Mapping[str, pl.DataType] | None = None,
    ) -> pl.DataFrame:
        """Run InfluxQL and parse the CSV answer straight into Polars (no per-point Python).

        Invalid UTF-8 in tag values (InfluxDB accepts it) is replaced by U+FFFD rather than
        failing the whole answer; the contract then quarantines those points.
        """
        body = self._post_csv(
            {**self._query_params(q, params), "chunked": "true", "chunk_size": "100000"}
        )
        if not body.strip():
            # In CSV mode InfluxDB drops statement errors (unknown database or retention policy,
            # a busy server) and answers an empty 200. Ask again as JSON, which reports them, and
            # use that answer: an empty CSV is never taken to mean "no points".
            if schema is None:
                self.query_json(q, params)
                return pl.DataFrame()
            return self.query_json_frame(q, params, schema)
        header = next(csv.reader([body[: body.find(b"\n")].decode(errors="replace")]))
        # Parse only the wanted columns: `name` and `tags` repeat on every row and cost memory.
        wanted = [c for c in (schema or header) if c in header and c not in ("name", "tags")]
        return pl.read_csv(
            io.BytesIO(body),
            columns=wanted,
            schema_overrides=dict(schema or {}),
            infer_schema_length=0 if schema else 100,
            encoding="utf8-lossy",
        ).select(wanted)

    def compactions_pending(self) -> int:
        """Active plus queued TSM compactions of this database (0 when the server is idle)."""
        total = 0
        for result in self.query_json("SHOW STATS FOR 'tsm1_engine'"):
            for series in result.get("series", []):
                if series.get("tags", {}).get("database") != self.database:
                    continue
                columns = series.get("columns", [])
                for row in series.get("values", []):
                    total += sum(
                        int(v or 0)
                        for c, v in zip(columns, row, strict=False)
                        if c.endswith(("CompactionsActive", "CompactionQueue"))
                    )
        return total

    def create_database(self) -> None:
        """Create the configured database (a no-op when it exists)."""
        self.query_json(f"CREATE DATABASE {quote_ident(self.database)}")

    def write_lines(self, body: bytes | str | Sequence[str]) -> None:
        """POST line protocol (nanosecond timestamps) to `/write`."""
        if not isinstance(body, bytes | str):
            body = "\n".join(body)
        if isinstance(body, str):
            body = body.encode()
        params = {"db": self.database, "precision": "ns"}
        if self.retention_policy:
            params["rp"] = self.retention_policy
        self._request("POST", "/write", params=params, data=body)
