"""The ``screen`` command: its files, its last line, clear errors, and resuming after a kill."""
import json

import pandas as pd
import pytest

from refusal_circuits import engine as E
from refusal_circuits import gate as G
from refusal_circuits.cli import main
from refusal_circuits.data import load_safety_pairs


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    load_safety_pairs().head(4).to_csv(path, index=False)
    return path


def test_screen_writes_its_tables_and_prints_the_gate_last(tmp_path, pairs_csv, capsys):
    out = tmp_path / "scr"
    assert main(["screen", "--model", "tiny-qwen2-2l", "--pairs", str(pairs_csv), "--out", str(out),
                 "--n-pairs", "3", "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    table = pd.read_csv(out / "interchange.csv")
    assert list(table.columns) == ["layer", "head", "necessity", "sufficiency", "necessity_pct", "sufficiency_pct",
                                   "gap", "method", "p_fwer"]
    assert len(table) == 2 * 4 and set(table.method) == {"exact"}
    assert list(pd.read_csv(out / "head_dla.csv").columns) == ["layer", "head", "dla", "ci_lo", "ci_hi"]
    manifest = json.loads((out / "manifest.json").read_text())
    for k in ("model", "weights", "pairs_hash", "n_pairs", "positions", "method", "seed", "versions", "timings_s",
              "statistics"):
        assert k in manifest
    best = table.assign(c=table.necessity_pct + table.sufficiency_pct).sort_values("c").iloc[-1]
    g = manifest["gate"]
    assert (g["layer"], g["head"]) == (best.layer, best["head"])
    assert last == (f"gate=L{g['layer']}H{g['head']} necessity_pct={g['necessity_pct']:.2f} "
                    f"sufficiency_pct={g['sufficiency_pct']:.2f} dla_rank={g['dla_rank']} n_heads=8")


def test_screen_resumes_after_a_kill(tmp_path, pairs_csv, monkeypatch):
    args = ["screen", "--model", "tiny-llama-2l", "--pairs", str(pairs_csv), "--n-pairs", "4", "--quiet"]
    real, calls, state = E.target_nll, [], {"die_at": None}

    def counting(logits, targets):
        calls.append(1)
        if state["die_at"] is not None and len(calls) == state["die_at"]:
            raise KeyboardInterrupt  # the job is killed in the sufficiency sweep
        return real(logits, targets)

    monkeypatch.setattr(E, "target_nll", counting)
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    n_whole = len(calls)
    calls.clear()
    state["die_at"] = n_whole  # the last patched forward
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "resumed")])
    saved = list((tmp_path / "resumed" / "checkpoints").rglob("*.parquet"))
    assert any("necessity" in p.name for p in saved) and any(p.parent.name.endswith(".parts") for p in saved)
    calls.clear()
    state["die_at"] = None
    assert main(args + ["--out", str(tmp_path / "resumed")]) == 0
    assert len(calls) <= 3  # only the last part of the sufficiency sweep (and its clean run) again
    a = pd.read_csv(tmp_path / "whole" / "interchange.csv")
    b = pd.read_csv(tmp_path / "resumed" / "interchange.csv")
    pd.testing.assert_frame_equal(a, b)
    assert json.loads((tmp_path / "resumed" / "manifest.json").read_text())["gate"] == \
        json.loads((tmp_path / "whole" / "manifest.json").read_text())["gate"]


@pytest.mark.parametrize("content,message", [
    ("", "empty"),
    ("harmful,harmless\nx,y\n", "'sensitive'"),
    ("sensitive,control\n,\n", "no pairs"),
])
def test_bad_pair_files_end_in_one_line(tmp_path, capsys, content, message):
    f = tmp_path / "p.csv"
    f.write_text(content)
    assert main(["screen", "--model", "tiny-llama-2l", "--pairs", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_too_many_pairs_and_a_model_that_does_not_refuse(tmp_path, pairs_csv, capsys):
    assert main(["screen", "--model", "tiny-llama-2l", "--pairs", str(pairs_csv), "--out", str(tmp_path / "o"),
                 "--n-pairs", "99"]) == 2
    assert "larger than the pair file (4 pairs)" in capsys.readouterr().err
    # random weights do not refuse: if the mean gap is not positive the screen says so and still writes
    assert main(["screen", "--model", "tiny-llama-2l", "--pairs", str(pairs_csv), "--out", str(tmp_path / "w"),
                 "--quiet"]) == 0
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    err = capsys.readouterr().err
    assert (manifest["mean_gap"] <= 0) == ("does not refuse" in err)
    assert (tmp_path / "w" / "interchange.csv").exists()


def test_read_screens_gathers_the_folders(tmp_path, pairs_csv):
    from refusal_circuits.screen import read_screens

    assert main(["screen", "--model", "tiny-llama-2l", "--pairs", str(pairs_csv), "--out", str(tmp_path / "a" / "x"),
                 "--n-pairs", "2", "--quiet"]) == 0
    # a random-weight test model is not a refusal model: the panel leaves it out unless asked
    assert read_screens(tmp_path).empty
    panel = read_screens(tmp_path, include_random=True)
    assert len(panel) == 1 and panel.model[0] == "tiny-llama-2l" and 0 <= panel.gate_depth[0] <= 1
    from refusal_circuits.screen import read_sparsity

    assert read_sparsity(tmp_path, n_boot=50).empty
    sp = read_sparsity(tmp_path, n_boot=50, include_random=True)
    assert list(sp.statistic) == ["top1", "top5", "top10", "gini"] and set(sp.model) == {"tiny-llama-2l"}
    assert (sp.method == "exact").all() and (sp.n_heads == 8).all() and (sp.n_pairs == 2).all()
    # the 2-layer model has 8 heads: the top 10 hold everything
    assert sp.set_index("statistic").loc["top10", "estimate"] == pytest.approx(1.0)


def test_attribution_screen_confirms_its_top_k_exactly(tmp_path, pairs_csv, capsys):
    from refusal_circuits import load_model
    from refusal_circuits.screen import screen

    m = load_model("tiny-llama-2l")
    screen(m, pairs_csv, tmp_path / "exact", n_pairs=3, progress=False)
    at = screen(m, pairs_csv, tmp_path / "atp", n_pairs=3, method="attribution", top_k=3, bottom_k=2, progress=False)
    a = pd.read_csv(tmp_path / "atp" / "interchange.csv")
    e = pd.read_csv(tmp_path / "exact" / "interchange.csv")
    assert (a.method == "exact").sum() == 5 and (a.method == "attribution").sum() == len(a) - 5
    assert at["method"] == "attribution" and at["top_k"] == 3 and at["n_exact_heads"] == 5
    assert a.p_fwer.notna().sum() == 5 and at["statistics"]["n_heads"] == 5
    # the confirmed heads carry the exact numbers, and the gate is the best of them
    x = a[a.method == "exact"].merge(e, on=["layer", "head"], suffixes=("", "_exact"))
    assert x.necessity.values == pytest.approx(x.necessity_exact.values, abs=1e-5)
    assert x.sufficiency.values == pytest.approx(x.sufficiency_exact.values, abs=1e-5)
    best = x.assign(c=x.necessity_pct + x.sufficiency_pct).sort_values("c").iloc[-1]
    assert (at["gate"]["layer"], at["gate"]["head"]) == (best.layer, best["head"])
    # the five it confirmed are the three the estimate ranked highest and the two it ranked lowest
    est = G.summarise(*(G.attribution(m, G.prepare_pairs(m, G.load_pairs(pairs_csv), n_pairs=3), d, progress=False)
                        for d in ("necessity", "sufficiency")), pd.read_csv(tmp_path / "atp" / "pairs.csv"))
    picked = pd.concat([est.head(3), est.tail(2)])
    assert set(zip(picked.layer, picked["head"])) == set(zip(x.layer, x["head"]))
    written = pd.read_csv(tmp_path / "atp" / "attribution.csv")
    assert len(written) == len(a) and written.sort_values("rank").combined.values == pytest.approx(
        est.combined.values, rel=1e-5)
    assert not (tmp_path / "exact" / "attribution.csv").exists()
    abl = pd.read_csv(tmp_path / "atp" / "ablation.csv")
    assert {"layer", "head", "reduction", "reduction_pct", "rank"} <= set(abl.columns)
    assert at["ablation"]["top_head"] == f"L{abl.layer[0]}H{abl['head'][0]}"
    # the per-pair rows behind the summary (the scaling pair's bootstrap reads them)
    per_pair = pd.read_csv(tmp_path / "atp" / "ablation_pairs.csv")
    assert len(per_pair) == 3 * len(abl)
    means = per_pair.groupby(["layer", "head"]).reduction.mean()
    assert abl.set_index(["layer", "head"]).reduction.values == pytest.approx(means.loc[list(zip(abl.layer, abl["head"]))].values)


@pytest.mark.parametrize("arch", ["tiny-gemma-2l", "tiny-gemma2-2l", "tiny-qwen3-2l", "tiny-phi3-2l", "tiny-mistral-2l", "tiny-glm4-2l"])
def test_screen_runs_on_every_tiny_architecture(tmp_path, pairs_csv, arch, capsys):
    # (tiny-llama and tiny-qwen2 run in the tests above)
    assert main(["screen", "--model", arch, "--pairs", str(pairs_csv), "--out", str(tmp_path / "o"),
                 "--n-pairs", "2", "--method", "attribution", "--top-k", "2", "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1].startswith("gate=L")
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    # tiny-gemma2's sliding window hides the prompt from the last position at L // 2: ablation is skipped, said so
    skipped = "skipped" in (manifest["ablation"] or {})
    assert skipped == ("ablation skipped" in out.err) == (not (tmp_path / "o" / "ablation.csv").exists())
    if skipped:                                          # the manifest says why, for notebook 06 to print
        assert "same mean residual" in manifest["ablation"]["skipped"]


def test_screen_of_a_local_model_folder(tmp_path, pairs_csv, capsys):
    from refusal_circuits.models import load_tiny_hf

    hf, tok = load_tiny_hf("qwen2", seed=1, n_layers=2)
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    assert main(["screen", "--model", str(tmp_path / "model"), "--pairs", str(pairs_csv), "--out",
                 str(tmp_path / "o"), "--n-pairs", "2", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("gate=L")
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["n_layers"] == 2


def test_align_start_is_the_papers_positions_and_equals_its_loop(tmp_path, pairs_csv, capsys):
    from refusal_circuits import load_model

    out = tmp_path / "start"
    assert main(["screen", "--model", "tiny-llama-2l", "--pairs", str(pairs_csv), "--out", str(out), "--align", "start",
                 "--n-pairs", "3", "--no-ablation", "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["positions"] == "paper"
    model = load_model("tiny-llama-2l")
    gp = G.prepare_pairs(model, G.load_pairs(pairs_csv), n_pairs=3)
    loop = G.interchange_loop(model, gp, "necessity", "paper")
    per = pd.read_csv(out / "interchange_pairs.csv")
    got = per[per.direction == "necessity"].sort_values(["layer", "head"], kind="stable")
    assert got.patched.values == pytest.approx(loop.patched.values, abs=1e-4)
    with pytest.raises(SystemExit) as exit_:
        main(["screen", "--model", "tiny-llama-2l", "--pairs", str(pairs_csv), "--out", str(out), "--positions", "middle"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def _planted_screen(folder, model, weights, n_params, reductions, gate="L3H1"):
    """A screen folder with a manifest and per-pair ablation rows (``reductions[head] = mean``)."""
    import numpy as np

    folder.mkdir(parents=True)
    (folder / "interchange.csv").write_text("layer,head\n")
    layer, head = map(int, gate[1:].split("H"))
    (folder / "manifest.json").write_text(json.dumps({
        "model": model, "weights": weights, "n_layers": 8, "n_heads": 4, "n_params": n_params, "n_pairs": 20,
        "positions": "prompt", "method": "attribution", "n_exact_heads": 18, "statistics": {"gate_p_fwer": 0.001},
        "gate": {"layer": layer, "head": head, "necessity_pct": 3.0, "sufficiency_pct": 1.0, "dla_rank": 9},
        "ablation": {"top_head": "L1H0", "top_reduction": max(reductions)}}))
    rng = np.random.default_rng(int(n_params))
    rows = [{"layer": 1, "head": h, "pair_id": p, "reduction": m + rng.normal(0, 0.01)}
            for h, m in enumerate(reductions) for p in range(20)]
    pd.DataFrame(rows).to_csv(folder / "ablation_pairs.csv", index=False)


def test_read_screens_keeps_the_last_roots_copy_of_a_model(tmp_path):
    from refusal_circuits.screen import read_screens

    _planted_screen(tmp_path / "data" / "m", "m", "w1", 5e8, [0.5, 0.1])
    _planted_screen(tmp_path / "data" / "n", "n", "w2", 1.5e9, [0.2, 0.1])
    _planted_screen(tmp_path / "results" / "m", "m", "w1", 5e8, [0.7, 0.1], gate="L5H2")
    _planted_screen(tmp_path / "results" / "m-other", "m", "w9", 5e8, [0.7, 0.1])   # other weights: its own row
    panel = read_screens([tmp_path / "data", tmp_path / "results"])
    assert sorted(zip(panel.model, panel.weights)) == [("m", "w1"), ("m", "w9"), ("n", "w2")]
    assert panel.set_index("weights").loc["w1", "gate"] == "L5H2"            # the later root's screen
    assert panel.set_index("weights").loc["w2", "gate_p_fwer"] == 0.001


def test_scaling_pair_measures_the_weakening_of_the_strongest_head(tmp_path):
    from refusal_circuits.screen import scaling_pair

    _planted_screen(tmp_path / "small", "s", "w1", 5e8, [0.1, 0.8, 0.3])
    _planted_screen(tmp_path / "large", "l", "w2", 1.5e9, [0.05, 0.2, 0.1])
    r = scaling_pair(tmp_path / "small", tmp_path / "large", n_boot=300)
    assert r["small"]["ablation_top_reduction"] == pytest.approx(0.8, abs=0.01)
    assert r["large"]["ablation_top_reduction"] == pytest.approx(0.2, abs=0.01)
    assert r["ratio"] == pytest.approx(4, rel=0.05) and r["ratio_lo"] > 3 and r["ratio_hi"] < 5
    assert r["large"]["gate"] == "L3H1" and r["small"]["gate_p_fwer"] == 0.001
    (tmp_path / "large" / "ablation_pairs.csv").unlink()
    with pytest.raises(FileNotFoundError, match="refusal-circuits screen"):
        scaling_pair(tmp_path / "small", tmp_path / "large")
