"""Synthetic smart-home telemetry: appliance profiles at 1 Hz, daily rhythms, noise and faults.

Every value is a pure function of (seed, device_id, absolute second): the same window generated
twice, or two overlapping windows, hold identical points. Randomness is a counter-based SplitMix64
hash evaluated as Polars expressions, which keeps generation vectorised over devices x seconds
without NumPy and independent of any global random state.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import polars as pl

NS_PER_S = 1_000_000_000
DAY_S = 86_400
POINT_COLUMNS = ("time", "device_id", "household_id", "power_w", "energy_wh", "voltage_v")
FLEET_COLUMNS = ("device_id", "household_id", "name", "model", "location", "timezone", "profile")
TIMEZONES = ("Europe/Berlin", "Europe/London", "America/New_York", "America/Chicago")
FAULTS = ("duplicate", "out_of_order", "late", "missing_field", "negative", "absurd",
          "unknown_device", "hostile_tags")  # fmt: skip
ABSURD_POWER_W = 10_000_000.0

# Ids that are legal line protocol but break naive string pasting into line protocol, InfluxQL,
# CSV or SQL. None ends with a backslash or has one before `,`, `=` or space (1.x can't store that).
HOSTILE_DEVICE_IDS = (
    'Küche fridge, "main"=1',
    "冷蔵庫;x\\y",
    "x' OR 1=1; DROP MEASUREMENT telemetry; --",
    "🔌 plug \\\\nas\\tv 'den'",
    "dev \"x\",y=z 'q' ; café\\\\;",
)
HOSTILE_HOUSEHOLD_IDS = (
    'hh Müller, "Nord"=1',
    "hh-o'brien; DROP DATABASE telemetry; --",
    "家\\族 🏠",
    "hh=1,2 3",
    'C:\\homes\\x "y"',
)


@dataclass(frozen=True)
class Profile:
    """An appliance kind: fleet metadata and the ranges per-device draw levels are drawn from."""

    label: str
    location: str
    models: tuple[str, ...]
    on_w: tuple[float, float]
    off_w: tuple[float, float]


PROFILES: dict[str, Profile] = {  # fmt: skip
    "fridge": Profile(
        "Fridge", "kitchen", ("Bosch KGN39", "Liebherr CNef 4835"), (100, 150), (1, 5)
    ),
    "hvac": Profile(
        "Heat pump", "utility room", ("Daikin Altherma 3", "Mitsubishi Ecodan"), (500, 3000), (3, 8)
    ),
    "ev_charger": Profile(
        "EV charger", "garage", ("Wallbox Pulsar", "myenergi zappi"), (7000, 11000), (0, 0)
    ),
    "lighting": Profile(
        "Lighting", "living room", ("Philips Hue", "IKEA Tradfri"), (20, 200), (0, 0)
    ),
    "standby": Profile(
        "TV and router", "living room", ("Samsung QE55", "FRITZ!Box 7590"), (2, 15), (2, 15)
    ),
    "washer": Profile("Washing machine", "bathroom", ("Miele WWD320",), (1800, 2200), (0.5, 1.5)),
    "dishwasher": Profile("Dishwasher", "kitchen", ("Bosch SMS4",), (1700, 2100), (0.3, 1)),
}
# Every household has the base appliances; further devices are drawn from the extras.
_BASE_PROFILES = ("fridge", "standby", "lighting", "hvac")
_EXTRA_PROFILES = ("ev_charger", "washer", "dishwasher", "standby", "lighting")


@dataclass
class FaultedBatch:
    """Points to write now, points to write later (timestamps in the past), rows hit per fault."""

    points: pl.DataFrame
    late: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def build_fleet(
    devices: int, seed: int = 42, devices_per_household: int = 5, hostile_ids: bool = False
) -> pl.DataFrame:
    """Device metadata: ids, household, name, model, location, timezone and appliance profile.

    With `hostile_ids`, up to five devices (spread over the fleet) and their households get ids with
    spaces, commas, `=`, quotes, backslashes, non-ASCII text and InfluxQL-injection-looking text.
    """
    if devices < 0 or devices_per_household < 1:
        raise ValueError("devices must be >= 0 and devices_per_household >= 1")
    rng = random.Random(seed)
    households = -(-devices // devices_per_household)
    zones = [rng.choice(TIMEZONES) for _ in range(households)]
    hostile = min(5, devices) if hostile_ids else 0
    # Spread over the fleet; a household keeps one (hostile) id for all of its devices.
    odd_devices = {
        k * devices // hostile: d for k, d in zip(range(hostile), HOSTILE_DEVICE_IDS, strict=False)
    }
    odd_households: dict[int, str] = {}
    for i in odd_devices:
        household = i // devices_per_household
        odd_households.setdefault(household, HOSTILE_HOUSEHOLD_IDS[len(odd_households)])
    rows = []
    for i in range(devices):
        h, slot = divmod(i, devices_per_household)
        kind = _BASE_PROFILES[slot] if slot < len(_BASE_PROFILES) else rng.choice(_EXTRA_PROFILES)
        profile = PROFILES[kind]
        rows.append(
            (odd_devices.get(i, f"dev-{i:06d}"), odd_households.get(h, f"hh-{h:05d}"),
             profile.label, rng.choice(profile.models), profile.location, zones[h], kind)
        )  # fmt: skip
    return pl.DataFrame(rows, schema=list(FLEET_COLUMNS), orient="row")


def generate_points(
    fleet: pl.DataFrame, start_ns: int, seconds: int, seed: int = 42
) -> pl.DataFrame:
    """One point per device per second for [start, start + seconds), ordered by time then fleet row.

    `start_ns` is rounded down to a whole second. Columns: `time` (Int64 ns), `device_id`,
    `household_id`, `power_w` (>= 0), `energy_wh` (= power_w * 1 s / 3600) and `voltage_v`.
    """
    start_s = start_ns // NS_PER_S
    if start_s < 0 or seconds < 0:
        raise ValueError("start_ns and seconds must be >= 0")
    unknown = sorted(set(fleet["profile"]) - set(PROFILES))
    if unknown:
        raise ValueError(f"unknown profile(s) {unknown}; valid: {', '.join(PROFILES)}")
    if fleet.height == 0 or seconds == 0:
        return pl.DataFrame(schema=_POINT_SCHEMA)
    params = _device_params(fleet, seed)
    present = set(params["profile"])
    clock = _clock(sorted(set(fleet["timezone"])), start_s, seconds).lazy()
    parts = [
        params.filter(pl.col("profile") == kind)
        .lazy()
        .join(clock, on="timezone")
        .with_columns(pkey=pl.col("dev_key") + pl.col("t").cast(pl.UInt64) * _u64(_GAMMA))
        .with_columns(power_w=power().clip(lower_bound=0.0).round(3))
        for kind, power in _POWER.items()
        if kind in present
    ]
    noise_v = pl.col("nominal_v") * (1 + _normal(pl.col("pkey"), 90) / 115)
    return (
        pl.concat(parts)
        .sort("t", "order")
        .select(
            (pl.col("t") * NS_PER_S).alias("time"),
            pl.col("device_id", "household_id", "power_w"),
            energy_wh=pl.col("power_w") / 3600.0,
            voltage_v=noise_v.round(2),
        )
        .collect()
    )


def inject_faults(
    points: pl.DataFrame, faults: Collection[str], rate: float = 0.01, seed: int = 42
) -> FaultedBatch:
    """Apply the named faults to a batch of points; `counts` says how many rows each one touched.

    `rate` of the rows (at least one when rate > 0) is hit per fault, on disjoint rows so counts can
    be checked. duplicate appends exact copies; out_of_order shuffles the rows (count = rows older
    than one before them); late moves rows into `late`; missing_field nulls power_w or energy_wh;
    negative and absurd rewrite power_w; unknown_device appends rows from `ghost-NNNN` devices.
    `hostile_tags` is a fleet option (`build_fleet(hostile_ids=True)`): here it changes nothing and
    counts the rows whose tags hold characters other than letters, digits, `-` and `_`.
    """
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; valid: {', '.join(FAULTS)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be within [0, 1], got {rate}")
    frame = points.select(POINT_COLUMNS)
    n = frame.height
    k = 0 if rate == 0 or n == 0 else min(n, max(1, round(rate * n)))
    sliced = [f for f in _ROW_FAULTS if f in faults]
    if k * len(sliced) > n:
        raise ValueError(f"{len(sliced)} faults x {k} rows need more rows than the batch has ({n})")
    order = pl.int_range(n, eager=True, dtype=pl.UInt32).shuffle(seed=seed)
    rows = {f: order.slice(j * k, k) for j, f in enumerate(sliced)}
    frame = frame.with_row_index("_row")
    counts: dict[str, int] = {}
    late = frame.clear()

    def hit(fault: str) -> pl.Expr:
        return pl.col("_row").is_in(rows.get(fault, order.clear()).implode())

    # Half the missing_field rows lose power_w, the rest energy_wh: real data has both gaps.
    first_half = pl.col("_row").is_in(rows.get("missing_field", order).head(-(-k // 2)).implode())
    frame = frame.with_columns(
        power_w=pl.when(hit("missing_field") & first_half).then(None)
        .when(hit("negative")).then(-(pl.col("power_w").abs() + 1.0))  # 0 W must turn negative too
        .when(hit("absurd")).then(ABSURD_POWER_W)
        .otherwise("power_w"),
        energy_wh=pl.when(hit("missing_field") & ~first_half).then(None).otherwise("energy_wh"),
    )  # fmt: skip
    if "late" in faults:
        late, frame = frame.filter(hit("late")), frame.filter(~hit("late"))
    if "duplicate" in faults:
        frame = pl.concat([frame, frame.filter(hit("duplicate"))])
    if "unknown_device" in faults:
        ghosts = frame.sample(k, seed=seed + 1, with_replacement=k > frame.height)
        ghost_no = (pl.int_range(pl.len()) % min(k, 10) + 1).cast(pl.String).str.zfill(4)
        ghosts = ghosts.with_columns(device_id="ghost-" + ghost_no, household_id=pl.lit("hh-ghost"))
        frame = pl.concat([frame, ghosts])
    if "out_of_order" in faults:
        frame = frame.sample(fraction=1.0, shuffle=True, seed=seed + 2)
        behind = pl.col("time") < pl.col("time").cum_max().shift(1)
        counts["out_of_order"] = int(frame.select(behind.fill_null(False).sum()).item())
    if "hostile_tags" in faults:
        odd = pl.any_horizontal(pl.col("device_id", "household_id").str.contains(r"[^\w-]"))
        counts["hostile_tags"] = int(frame.select(odd.sum()).item())
    counts.update({f: k for f in (*sliced, "unknown_device") if f in faults})
    return FaultedBatch(points=frame.drop("_row"), late=late.drop("_row"), counts=counts)


_POINT_SCHEMA = {"time": pl.Int64, "device_id": pl.String, "household_id": pl.String,
                 **dict.fromkeys(("power_w", "energy_wh", "voltage_v"), pl.Float64)}  # fmt: skip
# Faults that each take their own `rate` share of rows, disjoint so their counts can be checked.
_ROW_FAULTS = ("missing_field", "negative", "absurd", "late", "duplicate")
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64 increment: consecutive seconds map to spread-out keys
_GAMMA_DAY = 0xD1B54A32D192ED03


def _u64(value: int) -> pl.Expr:
    return pl.lit(value % 2**64, dtype=pl.UInt64)


def _mix(x: pl.Expr) -> pl.Expr:
    """SplitMix64 finaliser (UInt64 arithmetic wraps in Polars, as the algorithm needs)."""
    x = x.xor(x // _u64(1 << 30)) * _u64(0xBF58476D1CE4E5B9)
    x = x.xor(x // _u64(1 << 27)) * _u64(0x94D049BB133111EB)
    return x.xor(x // _u64(1 << 31))


def _uniform(key: pl.Expr, stream: int) -> pl.Expr:
    """Uniform floats in (0, 1), independent per key and per stream number."""
    bits = _mix(key + _u64(stream * 0xA0761D6478BD642F))
    return ((bits // _u64(1 << 11)).cast(pl.Float64) + 0.5) * 2.0**-53


def _normal(key: pl.Expr, stream: int) -> pl.Expr:
    """Standard normal floats (Box-Muller over two uniform streams)."""
    radius = (-2.0 * _uniform(key, stream).log()).sqrt()
    return radius * (2.0 * math.pi * _uniform(key, stream + 1)).cos()


def _device_params(fleet: pl.DataFrame, seed: int) -> pl.DataFrame:
    """Per-device key and draw levels; the key depends on seed and device_id, not on fleet order."""
    keys = [
        int.from_bytes(hashlib.blake2b(f"{seed}:{d}".encode(), digest_size=8).digest(), "little")
        for d in fleet["device_id"]
    ]
    key = pl.col("dev_key")
    kinds = pl.col("profile")

    def level(bound: str, stream: int) -> pl.Expr:
        ends = ({k: float(getattr(p, bound)[j]) for k, p in PROFILES.items()} for j in (0, 1))
        lo, hi = (kinds.replace_strict(end, return_dtype=pl.Float64) for end in ends)
        return lo + (hi - lo) * _uniform(key, stream)

    return (
        fleet.select("device_id", "household_id", "timezone", "profile")
        .with_columns(
            order=pl.int_range(pl.len()),
            dev_key=pl.Series(keys, dtype=pl.UInt64),
            nominal_v=pl.when(pl.col("timezone").str.starts_with("America/"))
            .then(120.0)
            .otherwise(230.0),
        )
        .with_columns(on_w=level("on_w", 1), off_w=level("off_w", 2))
        .with_columns(phase=_uniform(key, 3), jitter=_uniform(key, 4))
    )


def _clock(timezones: list[str], start_s: int, seconds: int) -> pl.DataFrame:
    """Each second per timezone: `t` (UTC epoch s), `local` (wall-clock epoch s), `hour` (0-24)."""
    t = pl.int_range(start_s, start_s + seconds, dtype=pl.Int64, eager=True)
    utc = pl.from_epoch(t, time_unit="s").dt.replace_time_zone("UTC")
    frames = [
        pl.DataFrame(
            {"t": t, "local": utc.dt.convert_time_zone(tz).dt.replace_time_zone(None).dt.epoch("s")}
        ).with_columns(timezone=pl.lit(tz))
        for tz in timezones
    ]
    return pl.concat(frames).with_columns(hour=(pl.col("local") % DAY_S) / 3600.0)


def _cycle(period_s: float, duty: pl.Expr | float) -> pl.Expr:
    """Whether a device with this (jittered) period and duty cycle is in the on part right now."""
    period = period_s * (0.9 + 0.2 * pl.col("jitter"))
    position = ((pl.col("t") + pl.col("phase") * period) % period) / period
    return position < duty


def _session(stream: int, anchor_h: float, start_h: tuple[float, float],
             duration_s: tuple[float, float], probability: float) -> pl.Expr:  # fmt: skip
    """Seconds since today's session began (null outside it): at most one random session a day.

    Days are counted from `anchor_h` local time so that a session never straddles a day boundary.
    """
    shifted = pl.col("local") - int(anchor_h * 3600)
    day = shifted // DAY_S
    key = pl.col("dev_key") + (day + 2**31).cast(pl.UInt64) * _u64(_GAMMA_DAY)
    begin = (start_h[0] - anchor_h + (start_h[1] - start_h[0]) * _uniform(key, stream)) * 3600
    length = duration_s[0] + (duration_s[1] - duration_s[0]) * _uniform(key, stream + 1)
    since = shifted - day * DAY_S - begin
    happens = (_uniform(key, stream + 2) < probability) & (since >= 0) & (since < length)
    return pl.when(happens).then(since)


def _noisy(watts: pl.Expr | float, relative_sd: float, stream: int) -> pl.Expr:
    return watts * (1.0 + relative_sd * _normal(pl.col("pkey"), stream))


def _fridge() -> pl.Expr:
    # Compressor on ~15 of every ~40 minutes; the phase differs per device so fleets don't sync.
    on = _cycle(2400, 0.33 + 0.09 * pl.col("jitter"))
    return _noisy(pl.when(on).then("on_w").otherwise("off_w"), 0.03, 10)


def _hvac() -> pl.Expr:
    # Heating demand peaks in the local morning and evening; the thermostat cycles at that duty.
    hour = pl.col("hour")
    demand = (
        0.15 + 0.85 * (-(((hour - 7) / 1.5) ** 2)).exp() + 0.9 * (-(((hour - 19) / 2.5) ** 2)).exp()
    ).clip(0, 1)
    running = 500 + (pl.col("on_w") - 500) * demand
    return _noisy(pl.when(_cycle(1200, demand)).then(running).otherwise("off_w"), 0.03, 10)


def _ev_charger() -> pl.Expr:
    since = _session(20, 12, (18, 25), (3600, 4 * 3600), 0.6)
    return _noisy(pl.when(since.is_not_null()).then("on_w").otherwise(0.0), 0.01, 10)


def _lighting() -> pl.Expr:
    evening = _session(20, 12, (17.75, 19), (3.5 * 3600, 5 * 3600), 0.95)
    morning = _session(30, 0, (6, 7), (1800, 5400), 0.5)
    lit = evening.is_not_null() | morning.is_not_null()
    return _noisy(pl.when(lit).then("on_w").otherwise(0.0), 0.02, 10)


def _standby() -> pl.Expr:
    return _noisy(pl.col("on_w"), 0.05, 10)


def _programme(
    stream: int, anchor_h: float, start_h: tuple[float, float], phases: list, probability: float
) -> pl.Expr:
    """A programme run at most once a day: `(end second, watts)` phases, idle draw otherwise."""
    since = _session(stream, anchor_h, start_h, (phases[-1][0], phases[-1][0]), probability)
    watts: Any = pl.when(since.is_null()).then(pl.col("off_w"))
    for end_s, phase_w in phases:
        watts = watts.when(since < end_s).then(phase_w)
    return _noisy(watts.otherwise(pl.col("off_w")), 0.04, 10)


def _washer() -> pl.Expr:
    # 90 min: heat the water, turn the drum, spin.
    return _programme(20, 4, (8, 20), [(1200, pl.col("on_w")), (4800, 250.0), (5400, 550.0)], 0.4)


def _dishwasher() -> pl.Expr:
    # 2 h in the evening: heat the wash water, pump, heat the rinse, dry.
    phases = [(1200, pl.col("on_w")), (5400, 60.0), (6300, pl.col("on_w")), (7200, 30.0)]
    return _programme(20, 12, (19, 22), phases, 0.6)


_POWER: dict[str, Callable[[], pl.Expr]] = {  # fmt: skip
    "fridge": _fridge,
    "hvac": _hvac,
    "ev_charger": _ev_charger,
    "lighting": _lighting,
    "standby": _standby,
    "washer": _washer,
    "dishwasher": _dishwasher,
}
