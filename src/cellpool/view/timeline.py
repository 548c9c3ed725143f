"""A static picture of a finished run: one lane per worker, a bar per task.

Hand-written SVG, so it needs nothing installed, draws in milliseconds and stays in a
saved notebook as ``image/svg+xml``. With more tasks than pixel columns, each lane's
tasks are merged into busy spans on a pixel grid, and if the picture would still pass
``MAX_BYTES``, short idle gaps are bridged too: the SVG stays small whatever the count.

The columns of ``Results`` are read directly and mostly with C-level passes (``map``,
``zip``, ``compress``, ``set``), as a Python loop over a million records would take
about a second.
"""

from __future__ import annotations

import html
import math
import os
import re
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from itertools import compress
from pathlib import Path
from typing import TYPE_CHECKING

from .figures import clock

if TYPE_CHECKING:
    from ..results import Results

Pause = tuple[str | None, float, float | None, str]
"""``(worker, start, end, reason)``: epoch seconds; ``worker`` ``None`` for every worker,
``end`` ``None`` for "until the end"."""

WIDTH = 760
LANE = 14  # lane height (bar plus gap) while lanes fit in LANES_HEIGHT
LANES_HEIGHT = 336  # 24 lanes of 14 px; more lanes get thinner: the picture stays < 400 px
TOP = 22  # the legend's line
BOTTOM = 24  # the axis and its labels
RIGHT = 14
LABEL_CHARS = 20
CHAR_WIDTH = 6.7  # an 11 px monospace character, for sizing the label column
MIN_LABEL_GAP = 11  # px between labelled lanes, when lanes are thinner than the text
MAX_BYTES = 90_000  # past this, idle gaps of 1, 3, 7, ... columns are drawn as busy
FAILED_HEIGHT = 4.0  # px: a failure in a thin lane still shows
MAX_ERROR = 80  # characters of an error message in a bar's tooltip

# Mid-tone colours on a transparent background: readable on light and dark pages.
TEXT = "#808080"
COLOURS = {
    "ok": "#4c8bd6",
    "error": "#e0454b",
    "timeout": "#e0454b",
    "crashed": "#e0454b",
    "cancelled": "#9a9a9a",
}
RETRIED = "#f0b400"
PAUSED = "#8b5cf6"
FAILED = ("error", "timeout", "crashed")

_STATUSES = ("ok", "error", "timeout", "crashed", "cancelled")  # results.STATUSES's order
_UNFILLED = 255
_SPARE = 4
_FLIP = bytes([1, 0]) + bytes(254)
_FAILED_CODES = bytes(1 if 1 <= code <= 3 else 0 for code in range(256))
_CANCELLED_CODES = bytes(1 if code == 4 else 0 for code in range(256))
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_DIGITS = re.compile(r"(\d+)")
_EM_SPACE = "\u2003"  # between legend items: XML collapses runs of ordinary spaces


class Timeline:
    """A picture of a run's tasks over time, as SVG text.

    Jupyter shows it through ``_repr_svg_`` and a saved notebook keeps it as an image.
    """

    def __init__(self, svg: str, tasks: int) -> None:
        self.svg = svg
        self._tasks = tasks

    def _repr_svg_(self) -> str:
        return self.svg

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the SVG to ``path`` (UTF-8)."""
        Path(path).write_text(self.svg, encoding="utf-8")

    def __repr__(self) -> str:
        # what was drawn, not how: a saved notebook's plain text stays the same
        return f"<cellpool timeline of {self._tasks:,} tasks>"


def timeline(results: Results, pauses: Iterable[Pause] = ()) -> Timeline:
    """Draw ``results``: one lane per worker, x in seconds since the run's first start.

    ``pauses`` are ``(worker, start, end, reason)`` tuples (epoch seconds) shaded behind
    the lanes; ``worker`` ``None`` shades every lane.
    """
    return Timeline(timeline_svg(results, pauses), len(results))


def timeline_svg(results: Results, pauses: Iterable[Pause] = ()) -> str:
    """The SVG text of ``timeline(results, pauses)``."""
    run = _Run(results)
    if not run.drawn:
        return _empty_svg(run)
    pauses = list(pauses)
    names = _lane_names(run, pauses)
    layout = _Layout.of(names, run)
    lanes = {name: i for i, name in enumerate(names)}
    lane_of = [lanes.get(name, -1) for name, _ in run.workers]
    paused = _pause_columns(pauses, run, layout, lanes)
    tasks, failed = _lane_counts(run, lane_of)
    if run.drawn <= layout.plot:
        marks = _Marks(_bars(run, layout, lane_of), tasks, failed)
        svg = _document(run, layout, names, marks, _shading(paused, layout, 0))
        if len(svg.encode()) <= MAX_BYTES:
            return svg
    layers = _layers(run, layout, lane_of)
    merge = 0  # idle gaps of up to this many columns are drawn as busy
    while True:
        marks = _Marks(_merged(layers, layout, merge), tasks, failed)
        svg = _document(run, layout, names, marks, _shading(paused, layout, merge))
        if len(svg.encode()) <= MAX_BYTES or merge >= layout.plot:
            return svg
        merge = merge * 2 + 1


# -- the run's columns ------------------------------------------------------------


class _Run:
    """What the picture needs of a ``Results``: its columns, with times made drawable.

    A record with one time has it as both; a record with none is not drawn. Times are
    on the internal clock (add ``clock`` for epoch seconds).
    """

    def __init__(self, results: Results) -> None:
        self.results = results
        self.codes = results._worker
        self.status = results._status
        self.attempts = results._attempts
        self.workers = results._workers
        self.clock = results._clock
        self.counts = results.counts()
        started, finished = results._started, results._finished
        no_start = bytes(map(math.isnan, started))
        no_finish = bytes(map(math.isnan, finished))
        self.drawable: bytes | None = None  # a 0/1 byte per record; None: all are drawn
        if 1 in no_start or 1 in no_finish:
            started, finished = _fill_one_sided(started, finished, no_start, no_finish)
            self.drawable = _and(no_start, no_finish).translate(_FLIP)
        self.started, self.finished = started, finished
        self.drawn = len(started) if self.drawable is None else self.drawable.count(1)
        self.not_drawn = len(started) - self.drawn - self.status.count(_UNFILLED)
        self.start = self.end = 0.0
        if self.drawn:
            first = 0 if self.drawable is None else self.drawable.index(1)
            # min and max skip NaN once they start from a number: NaN compares false.
            self.start = min(started[first:])
            self.end = max(finished[first:])

    def select(self, mask: bytes | None) -> tuple[Iterable[int], Iterable[float], Iterable[float]]:
        """Worker codes, starts and finishes of the drawn records ``mask`` keeps."""
        mask = self.drawn_of(mask)
        if mask is None:
            return self.codes, self.started, self.finished
        if mask.count(1) * 32 < len(mask):  # few: index them rather than scan three columns
            positions = [match.start() for match in re.finditer(b"\x01", mask)]
            return (
                [self.codes[p] for p in positions],
                [self.started[p] for p in positions],
                [self.finished[p] for p in positions],
            )
        return (
            compress(self.codes, mask),
            compress(self.started, mask),
            compress(self.finished, mask),
        )

    def drawn_of(self, mask: bytes | None) -> bytes | None:
        """``mask`` without the records that are not drawn (``None``: every record)."""
        if self.drawable is None or mask is None:
            return self.drawable if mask is None else mask
        return _and(mask, self.drawable)

    @cached_property
    def failed(self) -> bytes | None:
        """Records with a failed status, or ``None`` when there are none."""
        return _some(self.status.translate(_FAILED_CODES))

    @cached_property
    def cancelled(self) -> bytes | None:
        return _some(self.status.translate(_CANCELLED_CODES))

    @cached_property
    def retried(self) -> bytes | None:
        """Records run more than once, drawn or not."""
        if not self.attempts or max(self.attempts) <= 1:
            return None
        return _some(bytes(map((1).__lt__, self.attempts)))


def _some(mask: bytes) -> bytes | None:
    return mask if 1 in mask else None


def _and(a: bytes, b: bytes) -> bytes:
    """Byte-wise AND of two 0/1 masks, as one big-integer operation."""
    both = int.from_bytes(a, "little") & int.from_bytes(b, "little")
    return both.to_bytes(len(a), "little")


def _fill_one_sided(
    started: array[float], finished: array[float], no_start: bytes, no_finish: bytes
) -> tuple[array[float], array[float]]:
    """Copies in which a record with one time (rare) has it as both."""
    either = int.from_bytes(no_start, "little") ^ int.from_bytes(no_finish, "little")
    one_sided = either.to_bytes(len(no_start), "little")
    if 1 not in one_sided:
        return started, finished
    started, finished = array("d", started), array("d", finished)
    for p in compress(range(len(one_sided)), one_sided):
        if no_start[p]:
            started[p] = finished[p]
        else:
            finished[p] = started[p]
    return started, finished


def _natural(name: str | None) -> tuple[int, list[str | int]]:
    """Sort key: ``t2`` before ``t10``; no name last."""
    if name is None:
        return (1, [])
    parts = _DIGITS.split(name)
    return (0, [int(part) if i % 2 else part for i, part in enumerate(parts)])


def _lane_names(run: _Run, pauses: list[Pause]) -> list[str | None]:
    codes, _, _ = run.select(None)
    names = {run.workers[code][0] for code in set(codes)}
    names.update(worker for worker, *_ in pauses if worker is not None)
    return sorted(names, key=_natural)


# -- geometry ---------------------------------------------------------------------


@dataclass
class _Layout:
    left: int  # x of the plot's left edge
    plot: int  # plot width in px
    pitch: float  # lane height
    bar: float  # bar height
    gap: float  # from a lane's top to its bar
    lanes: int
    scale: float  # px per second
    span: float  # seconds on the axis

    @classmethod
    def of(cls, names: list[str | None], run: _Run) -> _Layout:
        longest = max((len(_label(name)) for name in names), default=1)
        left = math.ceil(min(longest, LABEL_CHARS) * CHAR_WIDTH) + 10
        plot = WIDTH - left - RIGHT
        lanes = max(len(names), 1)
        pitch = min(LANE, LANES_HEIGHT / lanes)
        gap = 3.0 if pitch >= 10 else pitch * 0.2 if pitch >= 3 else 0.0
        # A run shorter than a millisecond still gets an axis of one.
        span = max(run.end - run.start, 1e-3)
        return cls(left, plot, pitch, pitch - gap, gap / 2, lanes, plot / span, span)

    @property
    def height(self) -> int:
        return math.ceil(TOP + self.lanes * self.pitch + BOTTOM)

    def lane_top(self, lane: int) -> float:
        return TOP + lane * self.pitch


def _label(name: str | None) -> str:
    name = "?" if name is None else _clean(name)
    # Keep the end: it tells workers apart ("tcp://10.0.0.5:40123").
    return name if len(name) <= LABEL_CHARS else "\u2026" + name[-(LABEL_CHARS - 1) :]


def _clean(text: str) -> str:
    """``text`` with the characters XML cannot hold replaced."""
    return _NOT_XML.sub("\ufffd", text)


def _esc(text: str) -> str:
    return html.escape(_clean(text), quote=True)


def _num(x: float) -> str:
    text = f"{x:.1f}"
    return text[:-2] if text.endswith(".0") else text


# -- marks ------------------------------------------------------------------------


@dataclass
class _Marks:
    """SVG fragments per lane, in drawing order, and each lane's counts for its tooltip."""

    per_lane: dict[int, list[str]]
    tasks: Counter[int]
    failed: Counter[int]


def _lane_counts(run: _Run, lane_of: list[int]) -> tuple[Counter[int], Counter[int]]:
    """Per lane, how many tasks are drawn and how many of those failed."""
    counts = []
    for mask in (None, run.failed):
        lanes: Counter[int] = Counter()
        if mask is not None or not counts:
            codes, _, _ = run.select(mask)
            for code, n in Counter(codes).items():
                lanes[lane_of[code]] += n
        counts.append(lanes)
    return counts[0], counts[1]


def _bars(run: _Run, layout: _Layout, lane_of: list[int]) -> dict[int, list[str]]:
    """One rect per task with a tooltip; failures after (over) the rest."""
    everyone = range(len(run.started))
    positions = list(everyone if run.drawable is None else compress(everyone, run.drawable))
    positions.sort(key=lambda p: _STATUSES[run.status[p]] in FAILED)
    per_lane: dict[int, list[str]] = {}
    for p in positions:
        status = _STATUSES[run.status[p]]
        seconds = run.finished[p] - run.started[p]
        x = _num(layout.left + (run.started[p] - run.start) * layout.scale)
        width = seconds * layout.scale
        # A gap between a worker's consecutive tasks, when they are wide enough for one.
        width = width - 1 if width >= 3 else max(width, 2.0 if status in FAILED else 1.0)
        lane = lane_of[run.codes[p]]
        kind = "failed" if status in FAILED else status
        middle, height = _band(kind, lane, layout)
        tip = _tooltip(run.results, p, status, seconds, run.attempts[p])
        rect = (
            f'<rect class="{kind}" x="{x}" y="{_num(middle - height / 2)}" '
            f'width="{_num(width)}" height="{_num(height)}" fill="{COLOURS[status]}">'
            f"<title>{tip}</title></rect>"
        )
        if run.attempts[p] > 1:
            middle, height = _band("retried", lane, layout)
            rect += (
                f'<rect class="retried" x="{x}" y="{_num(middle - height / 2)}" '
                f'width="{_num(width)}" height="{_num(height)}" fill="{RETRIED}"/>'
            )
        per_lane.setdefault(lane, []).append(rect)
    return per_lane


def _tooltip(results: Results, p: int, status: str, seconds: float, attempts: int) -> str:
    text = f"#{results._index_at(p)} {status}, {seconds:.3g} s"
    if attempts > 1:
        text += f", {attempts} attempts"
    failure = results._failure.get(p)
    if failure is not None and failure.error_type:
        error = f"{failure.error_type}: {failure.error or ''}"
        text += "\n" + (error if len(error) <= MAX_ERROR else error[: MAX_ERROR - 1] + "\u2026")
    return _esc(text)


def _band(kind: str, lane: int, layout: _Layout) -> tuple[float, float]:
    """The middle and height of a mark of ``kind``: a retry is a stripe along the bar's
    top, and a failure is at least ``FAILED_HEIGHT`` tall, over thin lanes' edges."""
    top = layout.lane_top(lane) + layout.gap
    if kind == "retried":
        height = max(1.0, layout.bar * 0.35)
        return top + height / 2, height
    height = max(layout.bar, FAILED_HEIGHT) if kind == "failed" else layout.bar
    return top + layout.bar / 2, height


@dataclass
class _Layer:
    """Tasks of one kind as busy pixel columns: per lane, a byte per column."""

    kind: str
    colour: str
    least: int  # columns a run is drawn at least as wide as
    rows: dict[int, bytearray]


def _layers(run: _Run, layout: _Layout, lane_of: list[int]) -> list[_Layer]:
    """Busy columns of every task, then over them the cancelled, failed and retried."""
    layers = [_Layer("busy", COLOURS["ok"], 1, _grid(run, layout, lane_of, None))]
    for kind, mask, colour, least in (
        ("cancelled", run.cancelled, COLOURS["cancelled"], 1),
        ("failed", run.failed, COLOURS["error"], 3),  # one in a million still shows
        ("retried", run.retried, RETRIED, 2),
    ):
        rows = {} if mask is None else _grid(run, layout, lane_of, mask)
        if rows:
            layers.append(_Layer(kind, colour, least, rows))
    return layers


def _grid(
    run: _Run, layout: _Layout, lane_of: list[int], mask: bytes | None
) -> dict[int, bytearray]:
    """Per lane, a byte per pixel column: 1 where a selected task ran."""
    codes, started, finished = run.select(mask)
    step = 1 / layout.scale  # seconds per column
    # One tuple per distinct (worker, first column, last column): a few per column.
    columns = map(step.__rfloordiv__, started), map(step.__rfloordiv__, finished)
    spans = set(zip(codes, *columns, strict=True))
    base = run.start // step
    # Spare columns past the plot take a last finish rounded up, with no bounds checks
    # per task; they are folded into the last column.
    ones = b"\x01" * (layout.plot + _SPARE)
    rows = [bytearray(layout.plot + _SPARE) for _ in range(layout.lanes)]
    for code, a, b in spans:
        row = rows[lane_of[code]]
        first = int(a - base)
        if b <= a:
            row[first] = 1
        else:
            end = int(b - base) + 1
            row[first:end] = ones[: end - first]
    for row in rows:
        if 1 in row[layout.plot :]:
            row[layout.plot - 1] = 1
        del row[layout.plot :]
    return {lane: row for lane, row in enumerate(rows) if 1 in row}


def _merged(layers: list[_Layer], layout: _Layout, merge: int) -> dict[int, list[str]]:
    """Per lane, a path per layer: a horizontal stroke per run of busy columns."""
    per_lane: dict[int, list[str]] = {}
    for layer in layers:
        for lane, row in layer.rows.items():
            middle, height = _band(layer.kind, lane, layout)
            path = _span_path(_runs(row, merge), middle, layout, layer.least)
            # The lane's group sets the bar's height as stroke-width; other marks their own.
            own = "" if height == layout.bar else f' stroke-width="{_num(height)}"'
            per_lane.setdefault(lane, []).append(
                f'<path class="{layer.kind}" d="{path}" stroke="{layer.colour}"{own}/>'
            )
    return per_lane


def _span_path(runs: list[tuple[int, int]], y: float, layout: _Layout, least: int) -> str:
    """``M`` to the first run, then relative moves: about 8 characters a run."""
    parts = []
    at = None
    for first, end in runs:
        width = max(end - first, least)
        first = min(first, layout.plot - width)
        if at is None:
            parts.append(f"M{layout.left + first} {_num(y)}h{width}")
        else:
            parts.append(f"m{first - at} 0h{width}")
        at = first + width
    return "".join(parts)


def _runs(row: bytearray, merge: int) -> list[tuple[int, int]]:
    """``(first, end)`` of each run of 1s in ``row``, bridging gaps of ``merge`` or fewer."""
    pattern = rb"\x01+" if merge == 0 else rb"\x01(?:\x00{0,%d}\x01)*" % merge
    return [match.span() for match in re.finditer(pattern, row)]


@dataclass
class _Pauses:
    """Paused pixel columns per lane (``None``: every lane), and the reasons given."""

    rows: dict[int | None, bytearray]
    reasons: dict[int | None, list[str]]


def _pause_columns(
    pauses: list[Pause], run: _Run, layout: _Layout, lanes: dict[str | None, int]
) -> _Pauses:
    found = _Pauses({}, {})
    start = run.start + run.clock
    for worker, begin, end, reason in pauses:
        end = run.end + run.clock if end is None else end
        first = max(int((begin - start) * layout.scale), 0)
        last = min(math.ceil((end - start) * layout.scale), layout.plot)
        if last <= first:
            continue
        lane = None if worker is None else lanes[worker]
        found.rows.setdefault(lane, bytearray(layout.plot))[first:last] = b"\x01" * (last - first)
        reasons = found.reasons.setdefault(lane, [])
        if str(reason) not in reasons:
            reasons.append(str(reason))
    return found


def _shading(pauses: _Pauses, layout: _Layout, merge: int) -> dict[int | None, str]:
    """Per lane, a translucent path over its paused columns, the reasons as its tooltip."""
    shading = {}
    for lane, row in pauses.rows.items():
        top = TOP if lane is None else layout.lane_top(lane)
        height = layout.lanes * layout.pitch if lane is None else layout.pitch
        path = _span_path(_runs(row, merge), top + height / 2, layout, 1)
        reasons = pauses.reasons[lane]
        more = [f"and {len(reasons) - 3} more"] if len(reasons) > 3 else []
        tip = _esc("paused: " + "; ".join(reasons[:3] + more))
        shading[lane] = (
            f'<path class="paused" d="{path}" stroke="{PAUSED}" stroke-opacity=".3" '
            f'stroke-width="{_num(height)}"><title>{tip}</title></path>'
        )
    return shading


# -- the document -----------------------------------------------------------------


def _svg_open(width: int, height: int, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(label)}" '
        "font-family=\"system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif\" "
        f'font-size="11" fill="{TEXT}">'
    )


def _empty_svg(run: _Run) -> str:
    counts = ", ".join(f"{n:,} {status}" for status, n in run.counts.items())
    text = "no task ran" + (f" ({counts})" if counts else "")
    width = math.ceil(len(text) * CHAR_WIDTH) + 8
    return (
        _svg_open(width, 24, "cellpool timeline: no task ran")
        + f'<text class="empty" x="4" y="16">{_esc(text)}</text></svg>'
    )


def _document(
    run: _Run,
    layout: _Layout,
    names: list[str | None],
    marks: _Marks,
    shading: dict[int | None, str],
) -> str:
    total = sum(run.counts.values())
    label = f"cellpool timeline: {total:,} tasks on {len(names)} workers"
    parts = [_svg_open(WIDTH, layout.height, label), _legend(run, bool(shading))]
    parts.append(_bands(layout))
    if None in shading:
        parts.append(shading[None])
    every = max(1, math.ceil(MIN_LABEL_GAP / layout.pitch))
    for lane, name in enumerate(names):
        parts.append(_lane(lane, name, layout, marks, shading.get(lane, ""), lane % every == 0))
    parts.append(_axis(layout))
    parts.append("</svg>")
    return "".join(parts)


def _bands(layout: _Layout) -> str:
    """A faint background behind the lanes, darker behind every other one."""
    height = layout.lanes * layout.pitch
    odd = "".join(
        f"M{layout.left} {_num(layout.lane_top(lane) + layout.pitch / 2)}h{layout.plot}"
        for lane in range(1, layout.lanes, 2)
    )
    return (
        f'<g class="bands" fill="{TEXT}" stroke="{TEXT}" fill-opacity=".05" stroke-opacity=".07">'
        f'<rect x="{layout.left}" y="{TOP}" width="{layout.plot}" height="{_num(height)}"/>'
        + (f'<path d="{odd}" stroke-width="{_num(layout.pitch)}"/>' if odd else "")
        + "</g>"
    )


def _legend(run: _Run, paused: bool) -> str:
    total = sum(run.counts.values())
    items = [f"{total:,} tasks"]
    for status, n in run.counts.items():
        items.append(_legend_item(status, COLOURS[status], n, status))
    retried = 0 if run.retried is None else run.retried.count(1)
    if retried:
        items.append(_legend_item("retried", RETRIED, retried, "retried"))
    if paused:
        items.append(f'<tspan fill="{PAUSED}" fill-opacity=".5">\u25a0</tspan> paused')
    if run.not_drawn:
        items.append(
            f'<tspan data-status="not-drawn" data-count="{run.not_drawn}">'
            f"{run.not_drawn:,} never started (not drawn)</tspan>"
        )
    return f'<text class="legend" x="4" y="14">{_EM_SPACE.join(items)}</text>'


def _legend_item(name: str, colour: str, n: int, key: str) -> str:
    return (
        f'<tspan fill="{colour}">\u25a0</tspan> '
        f'<tspan data-status="{key}" data-count="{n}">{name} {n:,}</tspan>'
    )


def _lane(
    lane: int, name: str | None, layout: _Layout, marks: _Marks, shading: str, labelled: bool
) -> str:
    top = layout.lane_top(lane)
    worker = "?" if name is None else name
    tasks, failed = marks.tasks[lane], marks.failed[lane]
    tip = f"{worker}: {tasks:,} task{'' if tasks == 1 else 's'}" + (
        f", {failed:,} failed" if failed else ""
    )
    parts = [
        f'<g class="lane" data-worker="{_esc(worker)}" stroke-width="{_num(layout.bar)}">'
        f"<title>{_esc(tip)}</title>",
        shading,
    ]
    if labelled:
        size = min(11, max(layout.pitch, MIN_LABEL_GAP) - 1)
        parts.append(
            f'<text class="label" x="{layout.left - 6}" y="{_num(top + layout.pitch / 2)}" '
            f'text-anchor="end" dominant-baseline="central" font-size="{_num(size)}" '
            f'font-family="ui-monospace, Menlo, Consolas, monospace">{_esc(_label(name))}</text>'
        )
    parts.extend(marks.per_lane.get(lane, ()))
    parts.append("</g>")
    return "".join(parts)


def _axis(layout: _Layout) -> str:
    y = TOP + layout.lanes * layout.pitch + 1
    parts = [f'<g class="axis" stroke="{TEXT}"><path d="M{layout.left} {_num(y)}h{layout.plot}"/>']
    labels = []
    for seconds, text in _ticks(layout.span):
        x = _num(layout.left + seconds * layout.scale)
        parts.append(f'<path d="M{x} {_num(y)}v4"/>')
        labels.append(
            f'<text class="tick" x="{x}" y="{_num(y + 15)}" text-anchor="middle">{text}</text>'
        )
    parts.append("</g>")
    return "".join(parts + labels)


def _ticks(span: float) -> list[tuple[float, str]]:
    """A few round times from 0 to ``span`` seconds, and their labels."""
    if span >= 120:
        steps = [60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400]
        step = next((s for s in steps if span / s <= 7), math.ceil(span / 7 / 86400) * 86400)
        return [(t, clock(t)) for t in range(0, int(span) + 1, step)]
    power = 10 ** math.floor(math.log10(span / 7))
    step = next(m * power for m in (1, 2, 5, 10) if span / (m * power) <= 7)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    count = int(span / step + 1e-9)
    return [(i * step, f"{i * step:.{decimals if i else 0}f} s") for i in range(count + 1)]
