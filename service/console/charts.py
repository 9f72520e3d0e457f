"""Bar and line charts as inline SVG, drawn on the server: no script, no inline style (the console's strict
Content-Security-Policy allows neither); colours come from console.css by class. Every label is escaped.
"""

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


def _grid(vmax, ticks=4):
    parts = []
    for i in range(ticks + 1):
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * i / ticks
        parts.append(f'<line class="grid" x1="{PAD}" y1="{y:.1f}" x2="{WIDTH - PAD / 2}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{PAD - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f'{escape(_number(vmax * i / ticks))}</text>')
    return parts


def _labels(names, xs, every):
    return [f'<text class="label" x="{x:.1f}" y="{HEIGHT - PAD + 16}" text-anchor="middle">{escape(name)}</text>'
            for i, (name, x) in enumerate(zip(names, xs)) if i % every == 0]


def bar_chart(points, label):
    """points: [(name, value >= 0), ...], one bar each, with its value as a tooltip."""
    vmax = max((value for _, value in points), default=0) or 1
    step = (WIDTH - 1.5 * PAD) / max(len(points), 1)
    parts, xs = _grid(vmax), []
    for i, (name, value) in enumerate(points):
        h = (HEIGHT - 2 * PAD) * value / vmax
        x = PAD + i * step + step * 0.15
        xs.append(x + step * 0.35)
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{step * 0.7:.1f}" '
                     f'height="{h:.1f}"><title>{escape(name)}: {escape(_number(value))}</title></rect>')
    parts += _labels([name for name, _ in points], xs, max(1, len(points) // 10))
    return _frame(label, parts)


def line_chart(points, label):
    """points: [(name, value), ...] evenly spaced (days), as a line with a dot per point."""
    vmax = max((value for _, value in points), default=0) or 1
    dx = (WIDTH - 1.5 * PAD) / max(len(points) - 1, 1)
    xs = [PAD + i * dx for i in range(len(points))]
    ys = [HEIGHT - PAD - (HEIGHT - 2 * PAD) * value / vmax for _, value in points]
    parts = _grid(vmax)
    parts.append('<polyline class="line" points="' + " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys)) + '"/>')
    parts += [f'<circle class="dot" cx="{x:.1f}" cy="{y:.1f}" r="3"><title>{escape(name)}: '
              f'{escape(_number(value))}</title></circle>' for (name, value), x, y in zip(points, xs, ys)]
    parts += _labels([name for name, _ in points], xs, max(1, len(points) // 7))
    return _frame(label, parts)
