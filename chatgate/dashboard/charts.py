"""Usage charts as SVG, drawn server-side by pygal (no JavaScript, no CDN).

pygal's optional tooltip script is loaded from a CDN by default; ``js=[]`` turns that off, and
the inline config script pygal always writes (inert without the tooltip script, and blocked by
the pages' CSP anyway) is removed, so the SVG is self-contained and script-free. Every chart on
a page also has its numbers in a table next to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pygal
from markupsafe import Markup
from pygal.style import Style

PALETTE = (
    "#4f46e5",
    "#0891b2",
    "#16a34a",
    "#ca8a04",
    "#db2777",
    "#7c3aed",
    "#ea580c",
    "#0d9488",
    "#64748b",
)
ERROR_COLORS = ("#dc2626", "#f59e0b")
_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>", re.DOTALL)
MAX_SERIES = 8
"""Series drawn before the rest are summed into "other"."""


def _style(colors: Sequence[str]) -> Style:
    """Colours and fonts matching the dashboard's stylesheet."""
    return Style(
        background="transparent",
        plot_background="transparent",
        foreground="#334155",
        foreground_strong="#0f172a",
        foreground_subtle="#e2e8f0",
        opacity=".9",
        opacity_hover="1",
        colors=tuple(colors),
        font_family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
        label_font_size=11,
        major_label_font_size=11,
        legend_font_size=12,
        title_font_size=14,
        value_font_size=11,
        no_data_font_size=16,  # a style's, not the chart's: pygal's own is 64
    )


def _top(series: Mapping[str, Sequence[int]], limit: int = MAX_SERIES) -> dict[str, list[int]]:
    """The ``limit - 1`` largest series, and the rest summed as "other" (keeps legends short)."""
    ranked = sorted(series.items(), key=lambda item: (-sum(item[1]), item[0]))
    if len(ranked) <= limit:
        return {name: list(values) for name, values in ranked}
    kept = {name: list(values) for name, values in ranked[: limit - 1]}
    rest = ranked[limit - 1 :]
    kept["other"] = [sum(values[i] for _, values in rest) for i in range(len(rest[0][1]))]
    return kept


def _integer_ticks(top: int) -> list[int] | None:
    """Whole-number y labels for small counts (pygal would print 0.2, 0.4, ...)."""
    if top == 0 or top > 8:
        return None  # no data (pygal draws its note), or pygal picks round ticks by itself
    return list(range(0, top + 1))


def stacked_days(
    title: str,
    days: Sequence[str],
    series: Mapping[str, Sequence[int]],
    *,
    colors: Sequence[str] = PALETTE,
    ranked: bool = True,
    empty: str = "No requests in this period",
) -> Markup:
    """A stacked bar chart, one bar per day, one colour per series; inline SVG markup.

    ``ranked`` orders the series by size (and folds the smallest into "other"); without it the
    series keep the given order and colours (errors, then 429s). ``empty`` is written across
    a chart whose series are all zero.
    """
    drawn = _top(series) if ranked else {name: list(values) for name, values in series.items()}
    rows = -(-len(drawn) // 3)
    top = max((sum(column) for column in zip(*drawn.values(), strict=True)), default=0)
    chart = pygal.StackedBar(
        style=_style(colors),
        js=[],
        disable_xml_declaration=True,
        explicit_size=False,
        width=760,
        height=260 + 22 * rows,
        title=title,
        legend_at_bottom=True,
        legend_at_bottom_columns=3,
        truncate_legend=40,
        truncate_label=-1,
        x_label_rotation=0,
        show_minor_x_labels=len(days) <= 10,
        x_labels_major_every=max(len(days) // 6, 1),
        y_labels=_integer_ticks(top),
        min_scale=1,
        max_scale=8,
        print_zeroes=False,
        margin=8,
        margin_bottom=8 + 14 * rows,
        no_data_text=empty,
    )
    chart.x_labels = list(days)
    for name, values in drawn.items():
        chart.add(name, [v or None for v in values])
    svg = _SCRIPT.sub("", chart.render(is_unicode=True))
    return Markup(svg)  # noqa: S704  pygal escapes the labels it draws
