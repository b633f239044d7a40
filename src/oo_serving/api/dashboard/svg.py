"""The dashboard's charts, drawn here as inline SVG: no script, no file, nothing fetched.

Every text that reaches the picture (a policy name, a feature name) is escaped. Colours
are the Okabe-Ito palette, told apart with colour blindness; each point carries a
<title>, which a browser shows on hover.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#7F7F7F")
INK = "#1f2328"
MUTED = "#59636e"
GRID = "#d8dee4"
DAY_MS = 86_400_000


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def swatch(index: int, *, dashed: bool = False) -> str:
    """A small legend mark in the colour of `index` (SVG: the page allows no inline style)."""
    if dashed:
        mark = f'<line x1="1" y1="6" x2="17" y2="6" stroke="{colour(index)}" stroke-width="2.5" stroke-dasharray="4 3"/>'
    else:
        mark = f'<rect x="1" y="1" width="16" height="10" rx="2" fill="{colour(index)}"/>'
    return f'<svg class="swatch" width="18" height="12" aria-hidden="true">{mark}</svg>'


def _fmt(value: float) -> str:
    """A coordinate: one decimal is finer than a pixel."""
    return f"{value:.1f}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values spanning [low, high], about `count` of them, the ends included."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        high = low + 1.0
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step + 1e-9) * step
    last = math.ceil(high / step - 1e-9) * step
    n = round((last - first) / step)
    return [first + i * step for i in range(n + 1)]


# ── line charts over time buckets ────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Series:
    """One line: a value (None: no data) per bucket, an optional band per bucket, and a
    note per bucket for its point's tooltip."""

    name: str
    colour: int
    values: Sequence[float | None]
    band: Sequence[tuple[float, float] | None] | None = None
    notes: Sequence[str] | None = None
    dashed: bool = False


@dataclass(frozen=True, slots=True)
class TimeAxis:
    start_ms: int
    bucket_ms: int
    buckets: int

    def label(self, i: int) -> str:
        return datetime.fromtimestamp((self.start_ms + i * self.bucket_ms) / 1000, tz=UTC).strftime(
            "%Y-%m-%d %H:%M UTC"
        )


@dataclass(frozen=True, slots=True)
class Frame:
    """The plot area inside a picture of width × height."""

    width: int
    height: int
    left: int = 58
    right: int = 14
    top: int = 12
    bottom: int = 40

    @property
    def inner_width(self) -> float:
        return self.width - self.left - self.right

    @property
    def inner_height(self) -> float:
        return self.height - self.top - self.bottom


def line_chart(
    series: Sequence[Series],
    axis: TimeAxis,
    *,
    label: str,
    y_format: Callable[[float], str],
    y_floor: float | None = None,
    y_ceiling: float | None = None,
    include_zero: bool = False,
    width: int = 600,
    height: int = 250,
) -> str:
    """Lines over the time buckets, with bands; y fitted to the lines (a band may widen it
    by at most half their span), clamped to [y_floor, y_ceiling]. The last bucket, still
    filling, is shaded."""
    frame = Frame(width, height)
    values = [v for s in series for v in s.values if v is not None]
    parts = [_svg_open(width, height, label)]
    if not values:
        parts.append(_empty(frame, "no decisions in this window"))
        parts.append("</svg>")
        return "".join(parts)
    low, high = _y_range(series, values, y_floor, y_ceiling, include_zero)
    ticks = nice_ticks(low, high)
    low, high = ticks[0], ticks[-1]
    if y_floor is not None:
        low = max(low, y_floor)
    if y_ceiling is not None:
        high = min(high, y_ceiling)
    ticks = [t for t in ticks if low - 1e-9 <= t <= high + 1e-9]

    def x(i: float) -> float:
        return frame.left + (i + 0.5) * frame.inner_width / axis.buckets

    def y(v: float) -> float:
        v = min(max(v, low), high)
        return frame.top + (1.0 - (v - low) / (high - low)) * frame.inner_height

    step = frame.inner_width / axis.buckets
    parts.append(
        f'<rect class="filling" x="{_fmt(frame.left + (axis.buckets - 1) * step)}"'
        f' y="{frame.top}" width="{_fmt(step)}" height="{_fmt(frame.inner_height)}"'
        ' fill="#f3f4f6"><title>this bucket is still filling</title></rect>'
    )
    parts += _y_grid(frame, ticks, y, y_format)
    parts += _x_labels(frame, axis)
    for s in series:
        parts += _band(s, x, y)
    for s in series:
        parts += _line(s, x, y, axis, y_format)
    parts.append("</svg>")
    return "".join(parts)


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
        f' role="img" aria-label="{escape(label)}" font-size="11">'
        f"<title>{escape(label)}</title>"
    )


def _empty(frame: Frame, text: str) -> str:
    return (
        f'<rect x="{frame.left}" y="{frame.top}" width="{_fmt(frame.inner_width)}"'
        f' height="{_fmt(frame.inner_height)}" fill="#f6f8fa"/>'
        f'<text x="{_fmt(frame.left + frame.inner_width / 2)}"'
        f' y="{_fmt(frame.top + frame.inner_height / 2)}" text-anchor="middle"'
        f' fill="{MUTED}" font-size="13">{escape(text)}</text>'
    )


def _y_range(
    series: Sequence[Series],
    values: list[float],
    floor: float | None,
    ceiling: float | None,
    include_zero: bool,
) -> tuple[float, float]:
    low, high = min(values), max(values)
    if include_zero:
        low, high = min(low, 0.0), max(high, 0.0)
    reach = max(0.5 * (high - low), 0.05)
    for s in series:
        for band in s.band or ():
            if band is not None:
                low = min(low, max(band[0], low - reach))
                high = max(high, min(band[1], high + reach))
    if floor is not None:
        low = max(low, floor)
    if ceiling is not None:
        high = min(high, ceiling)
    if high - low < 1e-9:
        pad = max(abs(high) * 0.1, 0.05)
        low, high = low - pad, high + pad
        if floor is not None and low < floor:
            low, high = floor, max(high, floor + 2 * pad)
        if ceiling is not None and high > ceiling:
            low, high = min(low, ceiling - 2 * pad), ceiling
    return low, high


def _y_grid(
    frame: Frame, ticks: list[float], y: Callable[[float], float], y_format: Callable[[float], str]
) -> list[str]:
    parts = []
    right = frame.left + frame.inner_width
    for t in ticks:
        py = _fmt(y(t))
        parts.append(
            f'<line x1="{frame.left}" y1="{py}" x2="{_fmt(right)}" y2="{py}" stroke="{GRID}"/>'
            f'<text x="{frame.left - 6}" y="{py}" dy="0.32em" text-anchor="end"'
            f' fill="{MUTED}">{escape(y_format(t))}</text>'
        )
    return parts


MINUTE_MS = 60_000
TICK_STEPS_MS = tuple(
    m * MINUTE_MS for m in (1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440, 2880, 10080)
)
"""Times between the x axis's labels: each is a round time (UTC), at most MAX_X_TICKS."""
MAX_X_TICKS = 8


def x_ticks(axis: TimeAxis) -> tuple[int, list[int]]:
    """The step between labels and the labelled times (Unix ms) over the axis: the
    smallest round step that gives at most MAX_X_TICKS of them."""
    end = axis.start_ms + axis.buckets * axis.bucket_ms
    span = end - axis.start_ms
    step = next((s for s in TICK_STEPS_MS if span / s <= MAX_X_TICKS), TICK_STEPS_MS[-1])
    first = -(-axis.start_ms // step) * step
    return step, list(range(first, end + 1, step))


def _x_labels(frame: Frame, axis: TimeAxis) -> list[str]:
    """A label at each round time (x_ticks): the time of day, with the date under it
    where the date changes; only the date when the step is a day or more."""
    step, ticks = x_ticks(axis)
    span = axis.buckets * axis.bucket_ms
    bottom = frame.top + frame.inner_height
    right = frame.left + frame.inner_width
    parts = [
        f'<line x1="{frame.left}" y1="{_fmt(bottom)}" x2="{_fmt(right)}"'
        f' y2="{_fmt(bottom)}" stroke="{MUTED}"/>'
    ]
    last_date = ""
    for t in ticks:
        moment = datetime.fromtimestamp(t / 1000, tz=UTC)
        px = frame.left + (t - axis.start_ms) / span * frame.inner_width
        anchor = "start" if px - frame.left < 16 else "end" if right - px < 16 else "middle"
        date = moment.strftime("%b %d")
        if step >= DAY_MS:
            lines = [date]
        else:
            lines = [moment.strftime("%H:%M")] + ([date] if date != last_date else [])
        last_date = date
        parts.append(
            f'<line x1="{_fmt(px)}" y1="{_fmt(bottom)}" x2="{_fmt(px)}" y2="{_fmt(bottom + 4)}"'
            f' stroke="{MUTED}"/>'
        )
        for row, text in enumerate(lines):
            parts.append(
                f'<text x="{_fmt(px)}" y="{_fmt(bottom + 16 + 13 * row)}" text-anchor="{anchor}"'
                f' fill="{MUTED}">{escape(text)}</text>'
            )
    return parts


def _runs(flags: Sequence[bool]) -> list[list[int]]:
    """The indices where `flags` is True, in maximal runs of neighbours."""
    runs: list[list[int]] = []
    for i, on in enumerate(flags):
        if not on:
            continue
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _band(s: Series, x: Callable[[float], float], y: Callable[[float], float]) -> list[str]:
    if s.band is None:
        return []
    band = s.band
    parts = []
    for run in _runs([b is not None for b in band]):
        upper = []
        lower = []
        for i in run:
            b = band[i]
            assert b is not None
            # A lone bucket's band is a short bar, not a line of no width.
            xs = [x(i - 0.3), x(i + 0.3)] if len(run) == 1 else [x(i)]
            upper += [f"{_fmt(px)},{_fmt(y(b[1]))}" for px in xs]
            lower += [f"{_fmt(px)},{_fmt(y(b[0]))}" for px in xs]
        points = " ".join(upper + lower[::-1])
        parts.append(
            f'<polygon class="band" points="{points}" fill="{colour(s.colour)}"'
            ' fill-opacity="0.16" stroke="none"/>'
        )
    return parts


def _line(
    s: Series,
    x: Callable[[float], float],
    y: Callable[[float], float],
    axis: TimeAxis,
    y_format: Callable[[float], str],
) -> list[str]:
    stroke = colour(s.colour)
    dash = ' stroke-dasharray="5 4"' if s.dashed else ""
    parts = [f'<g class="series" data-series="{escape(s.name)}">']
    for run in _runs([v is not None for v in s.values]):
        if len(run) > 1:
            points = " ".join(f"{_fmt(x(i))},{_fmt(y(s.values[i] or 0.0))}" for i in run)
            parts.append(
                f'<polyline points="{points}" fill="none" stroke="{stroke}"'
                f' stroke-width="2" stroke-linejoin="round"{dash}/>'
            )
    for i, v in enumerate(s.values):
        if v is None:
            continue
        note = f" ({s.notes[i]})" if s.notes is not None and s.notes[i] else ""
        tip = f"{s.name} · {axis.label(i)}: {y_format(v)}{note}"
        fill = "#ffffff" if s.dashed else stroke
        parts.append(
            f'<circle cx="{_fmt(x(i))}" cy="{_fmt(y(v))}" r="2.6" fill="{fill}"'
            f' stroke="{stroke}" stroke-width="1.2"><title>{escape(tip)}</title></circle>'
        )
    parts.append("</g>")
    return parts


# ── shares as stacked bars ───────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Segment:
    name: str
    colour: int
    share: float
    note: str = ""


def share_bars(
    rows: Sequence[tuple[str, Sequence[Segment]]], *, label: str, width: int = 600
) -> str:
    """One bar per row, its segments' shares of 100% side by side, each named inside the
    bar where it fits."""
    row_height, gap, left, right = 26, 12, 150, 8
    height = len(rows) * (row_height + gap) + 4
    inner = width - left - right
    parts = [_svg_open(width, height, label)]
    for r, (title, segments) in enumerate(rows):
        top = 2 + r * (row_height + gap)
        parts.append(
            f'<text x="{left - 8}" y="{top + row_height / 2}" dy="0.32em" text-anchor="end"'
            f' fill="{INK}" font-size="12">{escape(title)}</text>'
            f'<rect x="{left}" y="{top}" width="{inner}" height="{row_height}" fill="#f6f8fa"/>'
        )
        start = float(left)
        total = sum(s.share for s in segments)
        if total <= 0:
            parts.append(
                f'<text x="{left + 8}" y="{top + row_height / 2}" dy="0.32em" fill="{MUTED}">'
                "none yet</text>"
            )
            continue
        for s in segments:
            w = inner * s.share / total
            if w <= 0:
                continue
            tip = f"{s.name}: {100 * s.share / total:.1f}%" + (f" ({s.note})" if s.note else "")
            parts.append(
                f'<rect x="{_fmt(start)}" y="{top}" width="{_fmt(w)}" height="{row_height}"'
                f' fill="{colour(s.colour)}" stroke="#ffffff" stroke-width="1">'
                f"<title>{escape(tip)}</title></rect>"
            )
            text = f"{s.name} {100 * s.share / total:.0f}%"
            if w > 7 * len(text):
                parts.append(
                    f'<text x="{_fmt(start + 8)}" y="{top + row_height / 2}" dy="0.32em"'
                    f' fill="{_text_on(s.colour)}" font-size="12">{escape(text)}</text>'
                )
            start += w
    parts.append("</svg>")
    return "".join(parts)


def _text_on(index: int) -> str:
    """Dark or white text, whichever reads on the colour of `index`."""
    r, g, b = (int(colour(index)[k : k + 2], 16) for k in (1, 3, 5))
    return INK if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"


# ── weights: bars either side of zero ────────────────────────────────────────


def weight_bars(weights: Sequence[tuple[str, float]], *, label: str, width: int = 600) -> str:
    """One horizontal bar per (name, weight), from a zero line in the middle: right for a
    positive weight (blue), left for a negative one (orange)."""
    row, left, room = 22, 170, 56  # room: for a value's text beyond either end of a bar
    height = len(weights) * row + 8
    inner = width - left - 2 * room
    middle = left + room + inner / 2
    scale = max((abs(w) for _, w in weights if math.isfinite(w)), default=0.0) or 1.0
    parts = [_svg_open(width, height, label)]
    parts.append(
        f'<line x1="{_fmt(middle)}" y1="2" x2="{_fmt(middle)}" y2="{height - 4}" stroke="{MUTED}"/>'
    )
    for i, (name, w) in enumerate(weights):
        top = 4 + i * row
        value = w if math.isfinite(w) else 0.0
        length = inner / 2 * abs(value) / scale
        x0 = middle if value >= 0 else middle - length
        fill = PALETTE[0] if value >= 0 else PALETTE[5]
        end = middle + length + 6 if value >= 0 else middle - length - 6
        anchor = "start" if value >= 0 else "end"
        parts.append(
            f'<text x="{left - 10}" y="{top + row / 2 - 1}" dy="0.32em" text-anchor="end"'
            f' fill="{INK}" font-size="12">{escape(name)}</text>'
            f'<rect x="{_fmt(x0)}" y="{top + 3}" width="{_fmt(max(length, 0.5))}"'
            f' height="{row - 8}" rx="2" fill="{fill}"><title>{escape(name)} = {w:+.4f}</title></rect>'
            f'<text x="{_fmt(end)}" y="{top + row / 2 - 1}" dy="0.32em" text-anchor="{anchor}"'
            f' fill="{MUTED}">{w:+.3f}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# ── estimates with intervals ─────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Interval:
    """One row: a value with an inner interval (CI) and an outer one (CS); a None bound
    runs off the picture's edge."""

    name: str
    colour: int
    value: float | None
    inner: tuple[float | None, float | None]
    outer: tuple[float | None, float | None]


def interval_chart(
    rows: Sequence[Interval],
    *,
    label: str,
    reference: float | None = None,
    width: int = 600,
) -> str:
    """A dot per row with its outer interval as a thin line and its inner one as a thick
    one; `reference` (e.g. the logging policy's value) as a dashed vertical line."""
    row, left, right, bottom = 28, 150, 20, 28
    height = len(rows) * row + bottom + 6
    known = [v for r in rows for v in (r.value, *r.inner) if v is not None]
    if not known:
        return ""
    ticks = nice_ticks(min(known), max(known))
    low, high = ticks[0], ticks[-1]
    inner_width = width - left - right

    def x(v: float | None, default: float) -> float:
        value = default if v is None else min(max(v, low), high)
        return left + (value - low) / (high - low) * inner_width

    parts = [_svg_open(width, height, label)]
    axis_y = len(rows) * row + 6
    for t in ticks:
        px = _fmt(x(t, t))
        parts.append(
            f'<line x1="{px}" y1="2" x2="{px}" y2="{axis_y}" stroke="{GRID}"/>'
            f'<text x="{px}" y="{axis_y + 16}" text-anchor="middle" fill="{MUTED}">{t:g}</text>'
        )
    if reference is not None:
        px = _fmt(x(reference, reference))
        parts.append(
            f'<line x1="{px}" y1="2" x2="{px}" y2="{axis_y}" stroke="{INK}"'
            ' stroke-dasharray="4 3"/>'
        )
    for i, r in enumerate(rows):
        cy = 6 + i * row + row / 2
        stroke = colour(r.colour)
        parts.append(
            f'<text x="{left - 10}" y="{_fmt(cy)}" dy="0.32em" text-anchor="end" fill="{INK}"'
            f' font-size="12">{escape(r.name)}</text>'
        )
        if r.value is None:
            continue
        ox0, ox1 = x(r.outer[0], low), x(r.outer[1], high)
        ix0, ix1 = x(r.inner[0], low), x(r.inner[1], high)
        parts.append(
            f'<line x1="{_fmt(ox0)}" y1="{_fmt(cy)}" x2="{_fmt(ox1)}" y2="{_fmt(cy)}"'
            f' stroke="{stroke}" stroke-width="1.5"/>'
            f'<line x1="{_fmt(ix0)}" y1="{_fmt(cy)}" x2="{_fmt(ix1)}" y2="{_fmt(cy)}"'
            f' stroke="{stroke}" stroke-width="6" stroke-opacity="0.45"/>'
            f'<circle cx="{_fmt(x(r.value, r.value))}" cy="{_fmt(cy)}" r="4.5" fill="{stroke}">'
            f"<title>{escape(r.name)}: {r.value:.4f}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)
