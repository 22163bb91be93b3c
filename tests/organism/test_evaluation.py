"""Comparing a retrained organism with the committed one (``make organism-check``)."""
import pytest
import torch


def _fake_organism(folder, rates, weight):
    """An organism folder with a hand-written evaluation table and a one-tensor adapter."""
    import pandas as pd
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    rows = [{"model": "m", "set": "test split", "kind": kind, "n": 72, "refusal_rate": r,
             "logit_metric_mean": 10 * r, "logit_metric_std": 1.0} for kind, r in rates.items()]
    pd.DataFrame(rows).to_csv(folder / "evaluation.csv", index=False)
    save_file({"lora_A": torch.full((2, 3), weight)}, str(folder / "adapter_model.safetensors"))
    return folder


def test_compare_organisms_flags_only_differences_beyond_noise(tmp_path):
    from refusal_circuits.organism import compare_organisms

    ref = _fake_organism(tmp_path / "ref", {"harmful": 0.97, "harmless": 0.03}, 0.5)
    same = _fake_organism(tmp_path / "same", {"harmful": 0.97, "harmless": 0.03}, 0.5)
    close = _fake_organism(tmp_path / "close", {"harmful": 0.97 - 1 / 72, "harmless": 0.03 + 2 / 72}, 0.25)
    far = _fake_organism(tmp_path / "far", {"harmful": 0.80, "harmless": 0.03}, 0.5)

    table, diff = compare_organisms(ref, same)
    assert table["within_noise"].all() and diff == 0.0 and (table["refusal_rate_diff"] == 0).all()
    table, diff = compare_organisms(ref, close)  # one and two prompts of 72 (tolerance: 5 points)
    assert table["within_noise"].all() and diff == pytest.approx(0.25)
    table, _ = compare_organisms(ref, far)
    assert table.set_index("kind")["within_noise"].to_dict() == {"harmful": False, "harmless": True}
    assert table.set_index("kind").loc["harmful", "refusal_rate_diff"] == pytest.approx(-0.17)
    with pytest.raises(FileNotFoundError, match="make organism"):
        compare_organisms(ref, tmp_path)


def test_organism_check_cli_compares_without_retraining(tmp_path, capsys):
    from refusal_circuits.cli import main

    ref = _fake_organism(tmp_path / "ref", {"harmful": 0.97, "harmless": 0.03}, 0.5)
    far = _fake_organism(tmp_path / "far", {"harmful": 0.80, "harmless": 0.03}, 0.5)
    same = _fake_organism(tmp_path / "same", {"harmful": 0.97, "harmless": 0.03}, 0.5)
    assert main(["organism-check", "--out", str(same), "--reference", str(ref), "--skip-training"]) == 0
    assert "reproduced within noise" in capsys.readouterr().out
    assert main(["organism-check", "--out", str(ref), "--reference", str(ref), "--skip-training"]) == 2
    assert "must differ" in capsys.readouterr().err
    assert main(["organism-check", "--out", str(far), "--reference", str(ref), "--skip-training"]) == 1
    assert "NOT reproduced" in capsys.readouterr().out
