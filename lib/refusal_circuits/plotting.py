"""One small plotting module: a shared style and one way of saving figures.

:func:`save_figure` writes ``figures/<model>/<name>.html`` (sharing one ``plotly.min.js`` per folder, so
the repository stays light) and a PNG when a Chrome/Chromium is available for kaleido.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

FIGURES_DIR = Path(os.environ.get("REFUSAL_FIGURES_DIR", Path(__file__).resolve().parents[2] / "figures"))
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
    out = FIGURES_DIR / model_slug
    out.mkdir(parents=True, exist_ok=True)
    html = out / f"{name}.html"
    fig.write_html(html, include_plotlyjs="directory", full_html=True)
    want_png = png if png is not None else os.environ.get("REFUSAL_PNG", "1") != "0"
    if want_png:
        if chrome_path():
            try:
                fig.write_image(out / f"{name}.png", scale=1.5)
            except Exception as err:  # a broken Chrome should not lose the HTML figure
                print(f"PNG export failed ({type(err).__name__}); HTML written to {html}")
        elif not _png_note_shown:
            print("No Chrome/Chromium found: writing interactive HTML figures only "
                  "(apt-get install chromium for PNGs).")
            _png_note_shown = True
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
