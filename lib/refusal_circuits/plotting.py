"""One small plotting module: a shared style and one way of saving and showing figures.

:func:`save_figure` writes ``figures/<model>/<name>.html`` (sharing one ``plotly.min.js`` per folder, so
the repository stays light) and a PNG when a Chrome/Chromium is available for kaleido. A PNG that could
not be refreshed (no Chrome, or the export failed) is removed rather than left beside a newer HTML
figure that it no longer matches.

:func:`show` returns a :class:`FigureView`: in a notebook it is stored as the interactive Plotly figure
*and* the same PNG, so JupyterLab shows the interactive one and a code host, nbviewer or nbconvert
without JavaScript shows the image.
"""

from __future__ import annotations

import base64
import logging
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
    return _save(fig, name, model_slug, png)[0]


def _save(fig: go.Figure, name: str, model_slug: str, png: bool | None = None) -> tuple[Path, bytes | None]:
    global _png_note_shown
    out = figures_dir() / model_slug
    out.mkdir(parents=True, exist_ok=True)
    html = out / f"{name}.html"
    fig.write_html(html, include_plotlyjs="directory", full_html=True)
    png_path = out / f"{name}.png"
    want_png = png if png is not None else os.environ.get("REFUSAL_PNG", "1") != "0"
    image = None
    if want_png and chrome_path():
        # kaleido's browser driver logs a traceback for each browser message it cannot parse and then
        # carries on; in a notebook that lands in the stored outputs (with the machine's paths)
        logging.getLogger("choreographer").setLevel(logging.CRITICAL)
        try:
            image = fig.to_image(format="png", scale=1.5)
            png_path.write_bytes(image)
        except Exception as err:  # a broken Chrome should not lose the HTML figure
            print(f"PNG export failed ({type(err).__name__}); HTML written to {html}")
            image = None
    elif want_png and not _png_note_shown:
        print("No Chrome/Chromium found: writing interactive HTML figures only, and removing PNGs they "
              "replace (apt-get install chromium for PNGs).")
        _png_note_shown = True
    if image is None and png_path.exists():
        png_path.unlink()  # an old PNG would silently disagree with the new HTML figure
    return html, image


class FigureView:
    """What :func:`show` returns: the figure, displayed as interactive Plotly JSON plus its PNG.

    Attribute access goes to the Plotly figure (``view.data``, ``view.layout``); ``view.show()``
    displays it from inside a loop."""

    def __init__(self, fig: go.Figure, png: bytes | None, html: Path):
        self.fig, self.png, self.html = fig, png, html

    def __getattr__(self, name):
        if name.startswith("_"):  # never IPython's display hooks (``_ipython_display_``, ``_repr_html_``...)
            raise AttributeError(name)
        return getattr(self.fig, name)

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"application/vnd.plotly.v1+json": self.fig.to_plotly_json(),
                  "text/plain": f"<figure {self.html.name}: {self.fig.layout.title.text or ''}>"}
        if self.png is not None:
            bundle["image/png"] = base64.b64encode(self.png).decode("ascii")
        return bundle

    def show(self) -> None:
        from IPython.display import display
        display(self)


def wrap_title(text: str, width: int) -> str:
    """``text`` broken with ``<br>`` so that no line is longer than ``width`` characters."""
    import textwrap

    if not text or "<br>" in text or len(text) <= width:
        return text
    return "<br>".join(textwrap.wrap(text, width))


def tidy(fig: go.Figure) -> go.Figure:
    """What every saved figure gets: a title wrapped to the figure's width (nothing cut off, the top
    margin grown to fit) and axes that make room for their tick labels (nothing clipped)."""
    width = fig.layout.width or 820
    title = fig.layout.title.text or ""
    wrapped = wrap_title(title, max(40, int(width / 8.5)))
    if wrapped != title:
        lines = wrapped.count("<br>") + 1
        top = fig.layout.margin.t if fig.layout.margin.t is not None else 60
        fig.update_layout(title_text=wrapped, margin_t=max(top, 30 + 22 * lines))
    fig.update_xaxes(automargin=True)
    fig.update_yaxes(automargin=True)
    return fig


def group_colors(groups, ordered: bool = False) -> dict:
    """A colour per group: the study's fixed colours (harmful, harmless, attn, mlp...) where they apply,
    otherwise a qualitative palette of 24 distinct colours, or, for ``ordered`` groups (layers), a
    sequential scale from dark to light so the order reads off the colour."""
    import plotly.colors as pc

    groups = [str(g) for g in groups]
    if ordered:
        if len(groups) == 1:
            return {groups[0]: pc.sample_colorscale("Viridis", [0.0])[0]}
        return dict(zip(groups, pc.sample_colorscale("Viridis", [0.9 * i / (len(groups) - 1) for i in range(len(groups))])))
    palette = pc.qualitative.Dark24
    out, k = {}, 0
    for g in groups:
        fixed = COLORS.get(g.split()[0]) if g.split() else None
        if fixed and fixed not in out.values():
            out[g] = fixed
        else:
            out[g] = palette[k % len(palette)]
            k += 1
    return out


def show(fig: go.Figure, name: str, model_slug: str) -> FigureView:
    """Tidy the figure (:func:`tidy`), save it (HTML, and PNG when a Chrome is found), then return it
    for the notebook to display, as Plotly JSON with the PNG beside it."""
    html, image = _save(tidy(fig), name, model_slug)
    return FigureView(fig, image, html)


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
            x_ticktext: list[str] | None = None, colorscale: str = "RdBu_r", colorbar: str = "",
            marked: str | None = None, marked_name: str = "") -> go.Figure:
    """``value`` over a ``y`` x ``x`` grid (a tidy table is pivoted; missing cells stay blank). ``marked``:
    a boolean column; its true cells get a black square marker, named ``marked_name`` in the legend (e.g.
    which values are exact rather than estimated)."""
    grid = df.pivot_table(index=y, columns=x, values=value, aggfunc="mean")
    fig = go.Figure(go.Heatmap(
        z=grid.values, x=[str(c) for c in grid.columns], y=[str(i) for i in grid.index], zmid=zmid,
        colorscale=colorscale, colorbar=dict(title=colorbar or value),
        hovertemplate=f"{y_label} %{{y}}<br>{x_label} %{{x}}<br>{colorbar or value} = %{{z:.3f}}<extra></extra>"))
    if x_ticktext is not None:
        fig.update_xaxes(tickmode="array", tickvals=[str(c) for c in grid.columns], ticktext=x_ticktext)
    if marked is not None:
        m = df[df[marked].astype(bool)]
        fig.add_trace(go.Scatter(x=m[x].astype(str), y=m[y].astype(str), mode="markers", name=marked_name or marked,
                                 marker=dict(symbol="square-open", size=12, color="black", line=dict(width=2)),
                                 hovertemplate=f"{y_label} %{{y}}<br>{x_label} %{{x}}<br>{marked_name or marked}<extra></extra>"))
        fig.update_layout(legend=dict(orientation="h", y=-0.15))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label)
    return fig


def lines_with_band(df, x: str, value: str, group: str, title: str, x_label: str, y_label: str,
                    band: str = "std", ordered: bool = False) -> go.Figure:
    """Mean of ``value`` against ``x`` per ``group``, with a ±1 std (or ``band="sem"``) band in the
    line's colour (:func:`group_colors`; ``ordered`` groups get a sequential scale)."""
    fig = go.Figure()
    colors = group_colors(df[group].drop_duplicates(), ordered)
    for g, sub in df.groupby(group, sort=False):
        stats = sub.groupby(x)[value].agg(["mean", "std", "count"]).reset_index()
        spread = stats["std"].fillna(0.0) if band == "std" else stats["std"].fillna(0.0) / stats["count"] ** 0.5
        color = colors[str(g)]
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


CLASS_COLORS = {"direct": "#d62728", "diagonal": "#ff7f0e", "BOS": "#7f7f7f", "other": "#1f77b4"}


def head_class_scatter(classes, threshold: float, title: str) -> go.Figure:
    """Direct vs diagonal score of every head (mean, ±1 std error bars), coloured by class, with the
    thresholds drawn; hover shows the head and its three scores."""
    fig = go.Figure()
    for cls, sub in classes.groupby("class", sort=False):
        fig.add_trace(go.Scatter(
            x=sub.direct_mean, y=sub.diagonal_mean, mode="markers", name=cls,
            marker=dict(color=CLASS_COLORS.get(cls), size=8, opacity=0.8),
            error_x=dict(array=sub.direct_std, thickness=0.6, width=0),
            error_y=dict(array=sub.diagonal_std, thickness=0.6, width=0),
            customdata=sub[["label", "direct_mean", "diagonal_mean", "BOS_mean"]].values,
            hovertemplate="%{customdata[0]}<br>direct %{customdata[1]:.3f}<br>diagonal %{customdata[2]:.3f}"
                          "<br>BOS %{customdata[3]:.3f}<extra>" + cls + "</extra>"))
    fig.add_vline(x=threshold, line_dash="dash", line_color="grey")
    fig.add_hline(y=threshold, line_dash="dash", line_color="grey")
    fig.update_layout(title=title, xaxis_title="direct score (last position → subject)",
                      yaxis_title="diagonal score (attention to the previous position)")
    return fig


def pattern_grid(model, pairs, heads, pair: int = 0, half: str = "harmful", title: str = "") -> go.Figure:
    """Attention patterns of some heads on one prompt: one heatmap per ``(class, (layer, head))``, the
    query position on the vertical axis and the key position on the horizontal one, labelled by token."""
    import torch
    from plotly.subplots import make_subplots

    from . import hooks

    if not heads:
        return go.Figure().update_layout(title=(title or "Attention patterns") + " (no heads to show)")
    toks = pairs.tokens_a[pair] if half == "harmful" else pairs.tokens_b[pair]
    labels = [f"{i}:{model.tokenizer.decode([t])!r}"[:18] for i, t in enumerate(toks.tolist())]
    subject = int(pairs.pairs.subject_pos.iloc[pair])
    names = sorted({hooks.pattern(l) for _, (l, _) in heads})
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(toks[None], names_filter=lambda n: n in names)
    cols = min(3, len(heads))
    rows = -(-len(heads) // cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.14, vertical_spacing=0.26 if rows > 1 else 0.1,
                        subplot_titles=[f"{c}: L{l}H{h}" for c, (l, h) in heads])
    for k, (cls, (l, h)) in enumerate(heads):
        a = cache[hooks.pattern(l)][0, h].float().cpu().numpy()
        fig.add_trace(go.Heatmap(z=a, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1, showscale=k == 0,
                                 hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra>"
                                               f"L{l}H{h}</extra>"), row=k // cols + 1, col=k % cols + 1)
        fig.update_yaxes(autorange="reversed", title_text="query position", row=k // cols + 1, col=k % cols + 1,
                         tickfont=dict(size=7))
        fig.update_xaxes(title_text=f"key position (subject: {labels[subject]})", row=k // cols + 1,
                         col=k % cols + 1, tickfont=dict(size=7))
    fig.update_layout(title=title, width=400 * cols + 140, height=460 * rows + 120)
    return fig


def null_histogram(null, observed: float, observed_name: str, title: str, x_label: str,
                   unit: str = "random directions", nbins: int = 40) -> go.Figure:
    """A histogram of a null distribution (``unit`` names its draws) with the observed value drawn as a
    vertical line."""
    fig = go.Figure(go.Histogram(x=list(null), nbinsx=nbins, name=unit, marker_color="#9aa5b1",
                                 hovertemplate="%{x}<br>%{y} " + unit + "<extra></extra>"))
    fig.add_vline(x=float(observed), line_color=HARMFUL_COLOR, line_width=3,
                  annotation_text=f"{observed_name}: {observed:.2f}", annotation_position="top")
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title="count", showlegend=False)
    return fig


def cosine_histogram(cos, marked_ids, title: str) -> go.Figure:
    """Histogram of per-token cosines (a ``token_id, token, cos`` table), the marked tokens (e.g. the
    refusal tokens) drawn as vertical lines."""
    fig = go.Figure(go.Histogram(x=cos["cos"], nbinsx=120, marker_color="#9aa5b1",
                                 hovertemplate="cos %{x}<br>%{y} tokens<extra></extra>"))
    marked = cos.set_index("token_id").loc[list(marked_ids)]
    for tid, row in marked.iterrows():
        fig.add_vline(x=float(row["cos"]), line_color=HARMFUL_COLOR, line_dash="dot",
                      annotation_text=repr(row["token"]), annotation_position="top")
    fig.update_layout(title=title, xaxis_title="cosine with the token's unembedding", yaxis_title="tokens",
                      yaxis_type="log", showlegend=False)
    return fig


def singular_values(S, k: int, title: str) -> go.Figure:
    """Singular values in descending order on a log scale, the bottom ``k`` shaded."""
    n = len(S)
    fig = go.Figure(go.Scatter(x=list(range(n)), y=[float(s) for s in S], mode="lines",
                               hovertemplate="index %{x}<br>singular value %{y:.4f}<extra></extra>"))
    fig.add_vrect(x0=n - k - 0.5, x1=n - 0.5, fillcolor=HARMFUL_COLOR, opacity=0.15, line_width=0,
                  annotation_text=f"bottom {k}", annotation_position="top left")
    fig.update_layout(title=title, xaxis_title="singular value index (descending)", yaxis_title="singular value",
                      yaxis_type="log")
    return fig


def rank_scatter(df, x: str, y: str, label: str, marked: str, title: str, x_label: str, y_label: str) -> go.Figure:
    """One point per row (a head) at its two ranks, the ``marked`` row (the gate) drawn large; hover
    shows the label and both ranks."""
    fig = go.Figure(go.Scatter(x=df[x], y=df[y], mode="markers", name="heads",
                               marker=dict(color="#9aa5b1", size=6), text=df[label],
                               hovertemplate="%{text}<br>" + x_label + " %{x}<br>" + y_label + " %{y}<extra></extra>"))
    g = df[df[label] == marked]
    fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="markers+text", name=f"gate {marked}", text=g[label],
                             textposition="top right", marker=dict(color=HARMFUL_COLOR, size=14, symbol="star"),
                             hovertemplate="%{text}<br>" + x_label + " %{x}<br>" + y_label + " %{y}<extra>gate</extra>"))
    fig.update_layout(title=title, xaxis_title=x_label, yaxis_title=y_label)
    return fig


def panel_figure(panel, y: str, title: str, y_label: str) -> go.Figure:
    """The cross-model panel: ``y`` against model size (log scale). Each model is its own legend entry
    in its own colour (no labels on the points, so none can overprint another); the paper's models are
    circles, ours stars; hover names the model, its gate and the source."""
    import numpy as np

    fig = go.Figure()
    colors = group_colors(panel.model.drop_duplicates())
    for row in panel.itertuples(index=False):
        ours = str(row.source).startswith("ours")
        fig.add_trace(go.Scatter(
            x=[row.params_b], y=[getattr(row, y)], mode="markers", name=str(row.model).split("/")[-1],
            legendgroup=str(row.source), legendgrouptitle_text=str(row.source),
            marker=dict(size=15 if ours else 11, color=colors[str(row.model)], symbol="star" if ours else "circle",
                        line=dict(width=1, color="#333")),
            customdata=[[row.model, row.gate, row.source]],
            hovertemplate="%{customdata[0]}<br>gate %{customdata[1]}<br>" + y_label + " %{y:.2f}<br>"
                          "%{x:.2f}B parameters<extra>%{customdata[2]}</extra>"))
    lo, hi = np.log10(panel.params_b.min()), np.log10(panel.params_b.max())
    pad = 0.08 * max(hi - lo, 1.0)
    fig.update_layout(title=title, xaxis_title="parameters (billions, log scale)", yaxis_title=y_label,
                      xaxis_type="log", xaxis_range=[lo - pad, hi + pad], height=560, legend=dict(font_size=11))
    return fig


def sparsity_figure(sparsity, title: str) -> go.Figure:
    """Routing sparsity per model (:func:`refusal_circuits.screen.read_sparsity`): the share of the total
    |necessity| held by the top 1, 5 and 10 heads and the Gini coefficient, each with its bootstrap 95%
    interval; a dashed mark shows what equal heads would give (k / number of heads, Gini 0). Hover names
    the model, its heads and pairs, and whether every head was exact."""
    stats_order = ["top1", "top5", "top10", "gini"]
    labels = {"top1": "top 1 share", "top5": "top 5 share", "top10": "top 10 share", "gini": "Gini"}
    colors = group_colors(sparsity.model.drop_duplicates())
    fig = go.Figure()
    models = list(sparsity.model.drop_duplicates())
    for j, model in enumerate(models):
        d = sparsity[sparsity.model == model].set_index("statistic").loc[stats_order]
        offset = (j - (len(models) - 1) / 2) * 0.12
        fig.add_trace(go.Scatter(
            x=[i + offset for i in range(len(stats_order))], y=d.estimate, mode="markers", name=str(model),
            marker=dict(size=11, color=colors[model], symbol="star" if (d.method == "exact").all() else "star-open"),
            error_y=dict(type="data", symmetric=False, array=d.hi - d.estimate, arrayminus=d.estimate - d.lo),
            customdata=list(zip([labels[s] for s in stats_order], d.lo, d.hi, d.n_heads, d.n_pairs, d.method)),
            hovertemplate=f"{model}<br>" + "%{customdata[0]} %{y:.3f} [%{customdata[1]:.3f}, %{customdata[2]:.3f}]"
                          "<br>%{customdata[3]} heads, %{customdata[4]} pairs, %{customdata[5]}<extra></extra>"))
        n = int(d.n_heads.iloc[0])
        fig.add_trace(go.Scatter(
            x=[i + offset for i in range(len(stats_order))], y=[1 / n, min(5 / n, 1), min(10 / n, 1), 0.0],
            mode="markers", marker=dict(symbol="line-ew", size=16, line=dict(width=2, color=colors[model])),
            name=f"{model}: equal heads", legendgroup="equal", showlegend=True,
            hovertemplate=f"{model}: every one of {n} heads equal" + " %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, yaxis_title="share of total |necessity| (Gini: 0 equal, 1 one head)",
                      xaxis=dict(tickvals=list(range(len(stats_order))), ticktext=[labels[s] for s in stats_order],
                                 title="statistic (95% bootstrap interval over pairs; open star: some heads estimated)"),
                      yaxis_range=[0, 1.02], height=520)
    return fig
