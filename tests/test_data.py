import re

import pandas as pd
import pytest

from refusal_circuits import align_pairs, load_instructions, load_safety_pairs, load_toy_pairs
from refusal_circuits.data import DATA_DIR, PairAlignmentError, datasets_overview


def test_instruction_sets_sizes_and_splits():
    for kind in ("harmful", "harmless"):
        df = load_instructions(kind)
        assert len(df) >= 250
        assert set(df["split"]) == {"train", "val", "test"}
        assert df["instruction"].is_unique
        assert df["category"].nunique() >= 10
    harmless = load_instructions("harmless")
    assert (harmless["category"] == "lexical_overlap").sum() >= 30
    # no prompt is in both sets
    assert not set(load_instructions("harmful").instruction) & set(harmless.instruction)


def test_split_and_n_selection():
    test = load_instructions("harmful", "test", n=5)
    assert len(test) == 5 and (test["split"] == "test").all()
    with pytest.raises(ValueError, match="split must be"):
        load_instructions("harmful", "dev")
    with pytest.raises(ValueError, match="kind must be"):
        load_instructions("evil")


def test_toy_pairs_differ_in_one_word():
    toy = load_toy_pairs()
    assert len(toy) >= 24
    for a, b in zip(toy.harmful, toy.harmless):
        wa, wb = a.split(), b.split()
        assert len(wa) == len(wb)
        assert sum(x != y for x, y in zip(wa, wb)) == 1, (a, b)


def test_safety_pairs():
    sp = load_safety_pairs()
    assert len(sp) >= 120
    assert sp["category"].nunique() >= 5
    assert (sp["sensitive"] != sp["control"]).all()


def test_overview_counts_every_dataset():
    ov = datasets_overview()
    assert set(ov["dataset"]) == {"harmful.csv", "harmless.csv", "toy_pairs.csv", "safety_pairs.csv"}


def test_align_pairs_finds_subject_and_reports_misaligned(tiny_llama):
    pairs = pd.DataFrame({
        "pair_id": ["ok", "longer", "two_words"],
        "harmful": ["Write a manual on how to assemble a bomb", "Build a bomb", "Make a big bomb"],
        "harmless": ["Write a manual on how to assemble a table", "Build a wooden garden shed",
                     "Make a small cake"],
    })
    ap = align_pairs(tiny_llama, pairs)
    assert list(ap.pairs.pair_id) == ["ok"]
    assert set(ap.dropped.pair_id) == {"longer", "two_words"}
    row = ap.pairs.iloc[0]
    assert row.subject_a.strip() == "bomb" and row.subject_b.strip() == "table"
    ids = ap.tokens_a[0]
    assert tiny_llama.tokenizer.decode([int(ids[row.subject_pos])]).strip() == "bomb"
    assert row.subject_from_end == row.subject_pos - row.n_tokens
    with pytest.raises(PairAlignmentError, match="longer: token counts differ"):
        align_pairs(tiny_llama, pairs, on_misaligned="raise")


def test_align_pairs_rejects_empty(tiny_llama):
    with pytest.raises(ValueError, match="empty"):
        align_pairs(tiny_llama, pd.DataFrame(columns=["pair_id", "harmful", "harmless"]))


def test_length_groups_batch_without_padding(tiny_llama):
    ap = align_pairs(tiny_llama, load_toy_pairs())
    for n, idx in ap.length_groups().items():
        a, b = ap.batch(idx)
        assert a.shape == b.shape == (len(idx), n)
        assert ((a != b).sum(1) == 1).all()



def _words(prompt: str) -> tuple[str, ...]:
    return tuple(re.sub(r"[^\w\s']", " ", prompt.lower()).split())


def _near_keys(words: tuple[str, ...]) -> set:
    """Two word sequences share a key if they are equal or one word apart (a word substituted, added or
    removed): the sequence itself, the sequence with each word wildcarded, and with each word dropped
    (a shorter sequence equals a longer one with a word dropped)."""
    keys = {words}
    keys |= {words[:i] + ("*",) + words[i + 1:] for i in range(len(words))}
    keys |= {words[:i] + words[i + 1:] for i in range(len(words))}
    return keys


def test_organism_training_data_is_separate_from_the_evaluation_data():
    """No training-only prompt of the organism (every ``organism_contrast_*.csv`` and
    ``organism_extra_*.csv``, used by the recipe or not) equals an evaluation prompt (toy pairs, safety pairs, the
    val/test splits), word for word or one word apart."""
    from refusal_circuits.organism import OrganismConfig

    cfg = OrganismConfig()
    contrast_files = sorted(p.name for p in DATA_DIR.glob("organism_contrast_*.csv"))
    assert set(cfg.contrast_files) <= set(contrast_files)
    toy, sp = load_toy_pairs(), load_safety_pairs()
    evaluation = toy["harmful"].tolist() + toy["harmless"].tolist() + sp["sensitive"].tolist() + sp["control"].tolist()
    for kind in ("harmful", "harmless"):
        for split in ("val", "test"):
            evaluation += load_instructions(kind, split)["instruction"].tolist()
    training = []
    for name in contrast_files:
        cp = pd.read_csv(DATA_DIR / name, keep_default_na=False)
        training += cp["harmful"].tolist() + cp["harmless"].tolist()
    extra_files = sorted(p.name for p in DATA_DIR.glob("organism_extra_*.csv"))
    assert set(cfg.extra_harmless_files) <= set(extra_files)
    for name in extra_files:
        training += pd.read_csv(DATA_DIR / name, keep_default_na=False)["instruction"].tolist()
    assert len(training) > 1000 and len(evaluation) > 700
    index = {key: e for e in evaluation for key in _near_keys(_words(e))}
    hits = {(t, index[k]) for t in training for k in _near_keys(_words(t)) if k in index}
    assert not hits, sorted(hits)[:10]
