"""One small plotting module: a shared style and one way of saving figures.

:func:`save_figure` writes ``figures/<model>/<name>.html`` (sharing one ``plotly.min.js`` per folder, so
the repository stays light) and a PNG when a Chrome/Chromium is available for kaleido. A PNG that could
not be refreshed (no Chrome, or the export failed) is removed rather than left beside a newer HTML
figure that it no longer matches.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from .paths import figures_dir
HARMFUL_COLOR = "#d62728"
HARMLESS_COLOR = "#1f77b4"
COLORS = {"harmful": HARMFUL_COLOR, "harmless": HARMLESS_COLOR, "sensitive": HARMFUL_COLOR,
          "control": HARMLESS_COLOR, "attn": "#9467bd", "mlp": "#2ca02c"}
_png_note_shown = False

pio.templates["refusal"] = go.layout.Template(layout=go.Layout(
    font=dict(family="Helvetica, Arial, sans-serif", size=13), hovermode="closest",
    margin=dict(l=70, r=30, t=60, b=60), width=820, height=460,
))
pio.templates.default = "plotly_white+refusal"


def chrome_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return os.environ.get("BROWSER_PATH") if os.environ.get("BROWSER_PATH") else None


def save_figure(fig: go.Figure, name: str, model_slug: str, png: bool | None = None) -> Path:
    """Save ``fig`` as ``figures/<model_slug>/<name>.html`` (+ ``.png`` when a Chrome is found).
    Returns the HTML path."""
    global _png_note_shown
    out = figures_dir() / model_slug
    out.mkdir(parents=True, exist_ok=True)
    html = out / f"{name}.html"
    fig.write_html(html, include_plotlyjs="directory", full_html=True)
    png_path = out / f"{name}.png"
    want_png = png if png is not None else os.environ.get("REFUSAL_PNG", "1") != "0"
    refreshed = False
    if want_png and chrome_path():
        try:
            fig.write_image(png_path, scale=1.5)
            refreshed = True
        except Exception as err:  # a broken Chrome should not lose the HTML figure
            print(f"PNG export failed ({type(err).__name__}); HTML written to {html}")
    elif want_png and not _png_note_shown:
        print("No Chrome/Chromium found: writing interactive HTML figures only, and removing PNGs they "
              "replace (apt-get install chromium for PNGs).")
        _png_note_shown = True
    if not refreshed and png_path.exists():
        png_path.unlink()  # an old PNG would silently disagree with the new HTML figure
    return html


def show(fig: go.Figure, name: str, model_slug: str) -> go.Figure:
    """Save the figure, then return it so the notebook displays it."""
    save_figure(fig, name, model_slug)
    return fig


def hover_lines(**cols) -> str:
    """A hovertemplate from ``label=customdata index`` pairs, e.g. ``hover_lines(prompt=0)``."""
    return "<br>".join(f"{k}: %{{customdata[{v}]}}" for k, v in cols.items()) + "<extra></extra>"


# ------------------------------------------------------------------------------------------------
# Figures shared by several notebooks
# ------------------------------------------------------------------------------------------------


def token_pair_figure(tokens_a: list[str], tokens_b: list[str], label_a: str = "harmful",
                      label_b: str = "harmless", title: str = "") -> go.Figure:
    """Both halves of a pair token by token; the differing (subject) position is highlighted."""
    n = len(tokens_a)
    diff = [int(a != b) for a, b in zip(tokens_a, tokens_b)]
    show_a = [t.replace("\n", "\\n") for t in tokens_a]
    show_b = [t.replace("\n", "\\n") for t in tokens_b]
    fig = go.Figure(go.Heatmap(
        z=[diff, diff], x=list(range(n)), y=[label_b, label_a], text=[show_b, show_a],
        texttemplate="%{text}", colorscale=[[0, "#f4f4f4"], [1, "#ffbf80"]], showscale=False,
        customdata=[[f"{i} ({i - n})" for i in range(n)]] * 2,
        hovertemplate="position %{customdata}<br>token %{text}<extra>%{y}</extra>", xgap=2, ygap=2,
    ))
    fig.update_layout(title=title or "A toy pair in the chat template (subject position highlighted)",
                      xaxis_title="token position", height=260, width=max(820, 34 * n))
    return fig


def distribution_figure(df, value: str, group: str, title: str, value_label: str,
                        hover: str = "instruction") -> go.Figure:
    """A box + points plot of ``value`` per ``group`` (one point per prompt, hover shows the prompt)."""
    fig = go.Figure()
    for g, sub in df.groupby(group, sort=False):
        fig.add_trace(go.Box(y=sub[value], name=str(g), boxpoints="all", jitter=0.4, pointpos=0,
                             marker_color=COLORS.get(str(g).split()[0], None),
                             text=sub[hover] if hover in sub else None,
                             hovertemplate="%{text}<br>" + value_label + " = %{y:.2f}<extra></extra>"))
    fig.update_layout(title=title, yaxis_title=value_label, showlegend=False)
    return fig


def heatmap(df, x: str, y: str, value: str, title: str, x_label: str, y_label: str, zmid: float | None = 0.0,
            x_ticktext: list[str] | None = None, colorscale: str = "RdBu_r", colorbar: str = "") -> go.Figure:
    """``value`` over a ``y`` x ``x`` grid (a tidy table is pivoted; missing cells stay blank)."""
    grid = df.pivot_table(index=y, columns=x, values=value, aggfunc="mean")
    fig = go.Figure(go.Heatmap(
        z=grid.values, x=[str(c) for c in grid.columns], y=[str(i) for i in grid.index], zmid=zmid,
        colorscale=colorscale, colorbar=dict(title=colorbar or value),
        hovertemplate=f"{y_label} %{{y}}<br>{x_label} %{{x}}<br>{colorbar or value} = %{{z:.3f}}<extra></extra>"))
    if x_ticktext is not None:
        fig.update_xaxes(tickmode="array", tickvals=[str(c) for c in grid.columns], ticktext=x_ticktext)
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label)
    return fig


def lines_with_band(df, x: str, value: str, group: str, title: str, x_label: str, y_label: str,
                    band: str = "std") -> go.Figure:
    """Mean of ``value`` against ``x`` per ``group``, with a ±1 std (or ``band="sem"``) band."""
    fig = go.Figure()
    for g, sub in df.groupby(group, sort=False):
        stats = sub.groupby(x)[value].agg(["mean", "std", "count"]).reset_index()
        spread = stats["std"] if band == "std" else stats["std"] / stats["count"] ** 0.5
        color = COLORS.get(str(g).split()[0])
        xs = list(stats[x]) + list(stats[x])[::-1]
        ys = list(stats["mean"] + spread) + list(stats["mean"] - spread)[::-1]
        fig.add_trace(go.Scatter(x=xs, y=ys, fill="toself", line=dict(width=0), fillcolor=color, opacity=0.2,
                                 hoverinfo="skip", showlegend=False, legendgroup=str(g)))
        fig.add_trace(go.Scatter(x=stats[x], y=stats["mean"], mode="lines+markers", name=str(g),
                                 line=dict(color=color), legendgroup=str(g), customdata=stats[["std", "count"]],
                                 hovertemplate=f"{g}<br>{x_label} %{{x}}<br>mean %{{y:.3f}} "
                                               f"(std %{{customdata[0]:.3f}}, n=%{{customdata[1]}})<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label)
    return fig


def bars(df, x: str, value: str, group: str | None, title: str, x_label: str, y_label: str,
         err_lo: str | None = None, err_hi: str | None = None, hline: float | None = None) -> go.Figure:
    """Grouped bars of ``value`` with optional asymmetric error bars (columns ``err_lo``/``err_hi``
    hold the interval ends) and an optional horizontal reference line."""
    fig = go.Figure()
    groups = df.groupby(group, sort=False) if group else [("", df)]
    for g, sub in groups:
        error_y = None
        if err_lo and err_hi:
            error_y = dict(type="data", symmetric=False, array=sub[err_hi] - sub[value],
                           arrayminus=sub[value] - sub[err_lo])
        fig.add_trace(go.Bar(x=sub[x].astype(str), y=sub[value], name=str(g), error_y=error_y,
                             marker_color=COLORS.get(str(g).split()[0]) if g else None,
                             hovertemplate=f"{g} %{{x}}<br>{y_label} = %{{y:.3f}}<extra></extra>"))
    if hline is not None:
        fig.add_hline(y=hline, line_dash="dash", line_color="grey")
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label, barmode="group")
    return fig
