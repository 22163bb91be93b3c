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

    monkeypatch.setattr(go.Figure, "write_image", broken)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "fig.png").write_bytes(b"old")
    plotting.save_figure(go.Figure(), "fig", "m")
    assert (tmp_path / "m" / "fig.html").exists() and not (tmp_path / "m" / "fig.png").exists()
    assert "PNG export failed" in capsys.readouterr().out


def test_hover_lines():
    assert plotting.hover_lines(prompt=0, value=1) == "prompt: %{customdata[0]}<br>value: %{customdata[1]}<extra></extra>"
