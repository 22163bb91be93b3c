"""The transfer stage: windows derived from a residual-denoising table whose answer is known, and the
stage itself on a tiny model (saved, reloaded, the same)."""
import pandas as pd
import pytest

from refusal_circuits import stages
from refusal_circuits.results import ResultsStore


def _table(n_layers, subject, last):
    """fraction per (layer, position): ``subject(l)`` at the subject position, ``last(l)`` at -1."""
    rows = []
    for l in range(n_layers):
        rows.append({"layer": l, "position": -7, "fraction": subject(l)})
        rows.append({"layer": l, "position": -1, "fraction": last(l)})
    return pd.DataFrame(rows)


def test_windows_follow_a_planted_transfer():
    # the subject carries the information up to L11, the last position restores 20% at L9, 60% from L12
    table = _table(20, lambda l: 1.0 if l <= 11 else 0.0,
                   lambda l: 0.0 if l < 9 else (0.2 if l < 12 else 0.6))
    got = stages.transfer_windows(table, -7, 20, stages.TransferParams(), lambda: pytest.fail("not needed"))
    assert got["subject_until"] == 11 and got["last_from"] == 12
    assert got["window"] == [8, 9, 10, 11]          # layers 8..11 write what resid_pre 9..12 shows
    assert got["clamp_layer"] == 12 and got["self_repair_layers"] == list(range(12, 20))
    assert "L9" in got["reasons"]["window"] and "L12" in got["reasons"]["window"]


def test_a_sharp_transfer_is_widened_and_a_missing_one_falls_back():
    sharp = _table(30, lambda l: 1.0 if l <= 21 else 0.0, lambda l: 0.9 if l >= 22 else 0.0)
    got = stages.transfer_windows(sharp, -7, 30, stages.TransferParams(min_width=3), lambda: 0)
    assert got["window"] == [19, 20, 21] and got["clamp_layer"] == 22 and "widened" in got["reasons"]["window"]
    never = _table(9, lambda l: 1.0, lambda l: 0.05)
    got = stages.transfer_windows(never, -7, 9, stages.TransferParams(), lambda: 4)
    assert got["last_from"] is None and got["window"] == [3, 4, 5] and got["clamp_layer"] == 4
    assert "middle third" in got["reasons"]["window"] and "direction's layer L4" in got["reasons"]["clamp"]


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="low < high"):
        stages.TransferParams(low=0.6, high=0.5)


def test_transfer_stage_on_a_tiny_model_is_saved_and_reloaded(tiny_llama, tmp_path):
    store = ResultsStore("t", root=tmp_path)
    a = stages.transfer(tiny_llama, store, n_pairs=2, progress=False)
    assert a.table.position.max() == -1 and a.table.position.min() <= a.subject_position - 1
    assert a.window and all(0 <= l < tiny_llama.n_layers for l in a.window)
    assert 0 <= a.clamp_layer < tiny_llama.n_layers and a.self_repair_layers[-1] == tiny_llama.n_layers - 1
    b = stages.transfer(tiny_llama, store, n_pairs=2, progress=False)
    pd.testing.assert_frame_equal(a.table, b.table)
    assert (a.window, a.clamp_layer, a.params) == (b.window, b.clamp_layer, b.params)
    assert stages.STAGES["transfer"] is stages.transfer
