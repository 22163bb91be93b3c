"""Saving figures: HTML always, PNG when a Chrome is there, and no stale PNG left behind."""
import plotly.graph_objects as go

from refusal_circuits import plotting


def test_html_written_and_stale_png_removed_without_chrome(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_FIGURES_DIR", str(tmp_path))
    monkeypatch.setattr(plotting, "chrome_path", lambda: None)
    stale = tmp_path / "m" / "fig.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    html = plotting.save_figure(go.Figure(go.Scatter(x=[1], y=[2])), "fig", "m")
    assert html == tmp_path / "m" / "fig.html" and html.exists()
    assert not stale.exists()  # an old PNG would disagree with the new HTML


def test_failed_png_export_keeps_html_and_drops_old_png(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REFUSAL_FIGURES_DIR", str(tmp_path))
    monkeypatch.setattr(plotting, "chrome_path", lambda: "/usr/bin/chromium")

    def broken(self, *a, **k):
        raise RuntimeError("no display")

    monkeypatch.setattr(go.Figure, "to_image", broken)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "fig.png").write_bytes(b"old")
    plotting.save_figure(go.Figure(), "fig", "m")
    assert (tmp_path / "m" / "fig.html").exists() and not (tmp_path / "m" / "fig.png").exists()
    assert "PNG export failed" in capsys.readouterr().out


def test_show_stores_the_png_beside_the_plotly_json(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_FIGURES_DIR", str(tmp_path))
    monkeypatch.setattr(plotting, "chrome_path", lambda: "/usr/bin/chromium")
    monkeypatch.setattr(go.Figure, "to_image", lambda self, **k: b"\x89PNG fake")
    view = plotting.show(go.Figure(go.Scatter(x=[1], y=[2]), layout=dict(title="t")), "fig", "m")
    bundle = view._repr_mimebundle_()
    assert "application/vnd.plotly.v1+json" in bundle and "image/png" in bundle
    import base64
    assert base64.b64decode(bundle["image/png"]) == (tmp_path / "m" / "fig.png").read_bytes() == b"\x89PNG fake"
    assert view.layout.title.text == "t"  # attribute access reaches the figure
    from IPython.core.formatters import DisplayFormatter
    shown, _ = DisplayFormatter().format(view)              # what a notebook stores: both, not Plotly's own
    assert "image/png" in shown and "application/vnd.plotly.v1+json" in shown
    assert not hasattr(view, "_ipython_display_")
    monkeypatch.setattr(plotting, "chrome_path", lambda: None)
    assert "image/png" not in plotting.show(go.Figure(), "fig", "m")._repr_mimebundle_()


def test_png_really_renders_where_chromium_is_installed(tmp_path, monkeypatch):
    import pytest
    if plotting.chrome_path() is None:
        pytest.skip("not testable here: no Chrome/Chromium on this machine (apt-get install chromium)")
    monkeypatch.setenv("REFUSAL_FIGURES_DIR", str(tmp_path))
    view = plotting.show(go.Figure(go.Bar(x=["a"], y=[1])), "fig", "m")
    assert view.png is not None and view.png[:8] == b"\x89PNG\r\n\x1a\n"


def test_hover_lines():
    assert plotting.hover_lines(prompt=0, value=1) == "prompt: %{customdata[0]}<br>value: %{customdata[1]}<extra></extra>"


def test_analysis_figures_label_their_axes():
    import pandas as pd
    import torch

    classes = pd.DataFrame({"class": ["direct", "other"], "label": ["L1H0", "L1H1"], "direct_mean": [0.5, 0.1],
                            "diagonal_mean": [0.1, 0.0], "BOS_mean": [0.2, 0.9], "direct_std": [0.1, 0.0],
                            "diagonal_std": [0.0, 0.0]})
    fig = plotting.head_class_scatter(classes, 0.2, "t")
    assert len(fig.data) == 2 and "direct score" in fig.layout.xaxis.title.text
    fig = plotting.null_histogram([0.1, 0.2, 0.3], 0.9, "r", "t", "x")
    assert fig.layout.xaxis.title.text == "x" and fig.layout.yaxis.title.text == "count"
    cos = pd.DataFrame({"token_id": [0, 1, 2], "token": ["a", "b", "I"], "cos": [0.1, -0.2, 0.05]})
    assert plotting.cosine_histogram(cos, [2], "t").layout.yaxis.type == "log"
    assert plotting.singular_values(torch.tensor([3.0, 2.0, 1.0]), 1, "t").layout.yaxis.type == "log"
    ranks = pd.DataFrame({"dla_rank": [1, 2, 3], "interchange_rank": [3, 2, 1], "label": ["A", "B", "G"]})
    fig = plotting.rank_scatter(ranks, "dla_rank", "interchange_rank", "label", "G", "t", "x", "y")
    assert len(fig.data) == 2 and list(fig.data[1].text) == ["G"]
    panel = pd.DataFrame({"source": ["paper", "ours"], "model": ["a/b", "c"], "params_b": [2.0, 0.1],
                          "gate": ["L1H1", "L2H2"], "gate_depth": [0.5, 0.4]})
    fig = plotting.panel_figure(panel, "gate_depth", "t", "depth")
    assert fig.layout.xaxis.type == "log" and len(fig.data) == 2
    assert [t.name for t in fig.data] == ["b", "c"] and all(t.mode == "markers" for t in fig.data)  # no point labels
    assert fig.data[0].marker.color != fig.data[1].marker.color and fig.data[1].marker.symbol == "star"


def test_pattern_grid_labels_query_and_key(tiny_llama):
    from refusal_circuits import align_pairs, load_toy_pairs

    pairs = align_pairs(tiny_llama, load_toy_pairs().head(2))
    fig = plotting.pattern_grid(tiny_llama, pairs, [("direct", (1, 0)), ("BOS", (0, 2))], title="t")
    assert len(fig.data) == 2
    assert fig.layout.yaxis.title.text == "query position" and "key position" in fig.layout.xaxis.title.text
    assert fig.data[0].z.shape == (len(pairs.tokens_a[0]), len(pairs.tokens_a[0]))


def test_long_titles_wrap_and_groups_get_distinct_colours():
    fig = plotting.tidy(go.Figure(layout=dict(title="word " * 60, width=820)))
    lines = fig.layout.title.text.split("<br>")
    assert len(lines) > 1 and max(map(len, lines)) <= 820 / 8.5 and fig.layout.margin.t >= 30 + 22 * len(lines)
    eleven = plotting.group_colors([f"L{i}" for i in range(11)])
    assert len(set(eleven.values())) == 11                     # no colour used twice
    ordered = plotting.group_colors(["none", "L0", "L3"], ordered=True)
    assert len(set(ordered.values())) == 3
    assert plotting.group_colors(["harmful", "harmless"]) == {"harmful": plotting.HARMFUL_COLOR,
                                                             "harmless": plotting.HARMLESS_COLOR}
    import pandas as pd
    df = pd.DataFrame({"x": [0, 1] * 11, "v": range(22), "g": [f"L{i // 2}" for i in range(22)]})
    fig = plotting.lines_with_band(df, "x", "v", "g", "t", "x", "v")
    band_and_line = [(fig.data[i].fillcolor, fig.data[i + 1].line.color) for i in range(0, len(fig.data), 2)]
    assert all(b == l for b, l in band_and_line) and len({l for _, l in band_and_line}) == 11
