"""Bar and line charts as inline SVG, drawn on the server: no script, no inline style (the console's strict
Content-Security-Policy allows neither); colours come from console.css by class. Every label is escaped.
"""

import math

from markupsafe import Markup, escape

WIDTH, HEIGHT, PAD = 720, 240, 48


def _number(value):
    if abs(value) >= 1_000_000:
        return f"{value / 1_000_000:.3g}M"
    if abs(value) >= 10_000:
        return f"{value / 1_000:.3g}k"
    return f"{value:,.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.2g}"


def _frame(label, parts):
    head = (f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>{escape(label)}</title>')
    return Markup(head + "".join(parts) + "</svg>")


def _scale(vmax):
    """A round top for the axis and its number of steps: steps of 1, 2, 2.5 or 5 times a power of ten, about
    four of them, never below 1 (counts of requests and tokens are whole)."""
    step = max(vmax / 4, 1)
    power = 10.0 ** math.floor(math.log10(step))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= step and (m * power).is_integer())
    return step * max(math.ceil(vmax / step), 1), max(math.ceil(vmax / step), 1)


def _grid(top, ticks):
    parts = []
    for i in range(ticks + 1):
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * i / ticks
        parts.append(f'<line class="grid" x1="{PAD}" y1="{y:.1f}" x2="{WIDTH - PAD / 2}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{PAD - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{escape(_number(top * i / ticks))}</text>')
    return parts


def _labels(names, xs, every):
    return [f'<text class="label" x="{x:.1f}" y="{HEIGHT - PAD + 16}" text-anchor="middle">{escape(name)}</text>'
            for i, (name, x) in enumerate(zip(names, xs)) if i % every == 0]


def bar_chart(points, label):
    """points: [(name, value >= 0), ...], one bar each, with its value as a tooltip."""
    top, ticks = _scale(max((value for _, value in points), default=0))
    step = (WIDTH - 1.5 * PAD) / max(len(points), 1)
    parts, xs = _grid(top, ticks), []
    for i, (name, value) in enumerate(points):
        h = (HEIGHT - 2 * PAD) * value / top
        x = PAD + i * step + step * 0.15
        xs.append(x + step * 0.35)
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{step * 0.7:.1f}" '
                     f'height="{h:.1f}"><title>{escape(name)}: {escape(_number(value))}</title></rect>')
    parts += _labels([name for name, _ in points], xs, math.ceil(len(points) / 12))
    return _frame(label, parts)


def line_chart(points, label):
    """points: [(name, value), ...] evenly spaced (days), as a line with a dot per point."""
    top, ticks = _scale(max((value for _, value in points), default=0))
    dx = (WIDTH - 1.5 * PAD) / max(len(points) - 1, 1)
    xs = [PAD + i * dx for i in range(len(points))]
    ys = [HEIGHT - PAD - (HEIGHT - 2 * PAD) * value / top for _, value in points]
    parts = _grid(top, ticks)
    parts.append('<polyline class="line" points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys)) + '"/>')
    parts += [f'<circle class="dot" cx="{x:.1f}" cy="{y:.1f}" r="3"><title>{escape(name)}: '
              f'{escape(_number(value))}</title></circle>' for (name, value), x, y in zip(points, xs, ys)]
    parts += _labels([name for name, _ in points], xs, math.ceil(len(points) / 12))
    return _frame(label, parts)
