"""The reference numbers as data, and our values printed beside them."""
import pytest

from refusal_circuits import reference


def test_table_is_well_formed():
    df = reference.reference_table()
    assert list(df.columns)[:6] == list(reference.COLUMNS)
    assert set(df.paper) <= {"writeup", "arditi", "routes"}
    assert (df.value != "").all() and (df.source != "").all()
    assert not df.duplicated(["experiment", "quantity", "model"]).any()
    gates = df[(df.experiment == "gate") & (df.quantity == "gate")]
    assert len(gates) == 12 and gates.value.str.fullmatch(r"L\d+H\d+").all()  # the paper's twelve gates


def test_value_and_beside():
    assert reference.value("refusal_direction", "layer") == 10.0
    assert reference.value("gate", "gate", model="Qwen/Qwen3-8B") == "L17H17"
    table = reference.beside("refusal_direction", {"layer": 21, "kl": 2.0912, "bypass": -3.14159})
    row = table.set_index("quantity")
    assert row.loc["layer", "ours"] == "21" and row.loc["layer", "reference"] == "10"
    assert row.loc["kl", "ours"] == "2.09" and row.loc["bypass", "ours"] == "-3.14"
    assert row.loc["induce", "ours"] == "—"  # a quantity we did not pass


def test_unknown_names_are_errors_not_silent():
    with pytest.raises(ValueError, match="no \\['layr'\\]"):
        reference.beside("refusal_direction", {"layr": 3})
    with pytest.raises(ValueError, match="No reference numbers for experiment"):
        reference.lookup("not_an_experiment")


def test_fmt():
    assert [reference.fmt(v) for v in (3, 0.05, 12.345, True, None, ["a", 2], [])] == \
        ["3", "0.050", "12.35", "yes", "—", "a, 2", "none"]


def test_show_prints_both(capsys):
    reference.show("toy_metric", {"harmful − harmless gap": 11.8}, "my-model")
    out = capsys.readouterr().out
    assert "ours: my-model" in out and "google/gemma-2b-it" in out and "11.80" in out


def test_conclusion_verdicts_can_fail_and_name_untestable_claims(capsys):
    import pytest
    c = reference.Conclusion()
    assert c.add("a", "1.0", "x ≥ 0.5", 1.0 >= 0.5) == "holds"
    assert c.add("b", "0.1", "x ≥ 0.5", 0.1 >= 0.5) == "does not hold"
    assert c.add("c", "—", "x ≥ 0.5", None, precondition=(False, "no direct heads")) == "not testable here (no direct heads)"
    with pytest.raises(ValueError, match="no outcome"):
        c.add("d", "—", "x", None)
    # an interval that straddles the threshold decides neither way, and says so
    assert c.add("e", "0.4 [0.3, 0.6]", "lo ≥ 0.5 or hi < 0.5", reference.INCONCLUSIVE) == "inconclusive"
    with pytest.raises(ValueError, match="must be True, False"):
        c.add("f", "—", "x", "maybe")
    c.show()
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "- b: 0.1. Criterion: x ≥ 0.5. → does not hold" and len(out) == 4
    assert list(c.table().verdict) == ["holds", "does not hold", "not testable here (no direct heads)", "inconclusive"]


def test_conclusion_requires_a_model_that_refuses(capsys):
    c = reference.Conclusion(requires=(False, "the model does not refuse: harmful 0/24"))
    # the claim's own outcome is ignored: a non-refusing model cannot show how refusal works
    assert c.add("a", "1.0", "x ≥ 0.5", True) == "not testable here (the notebook's precondition above fails)"
    assert c.add("b", "—", "x", None) .startswith("not testable here")
    c.show()
    first = capsys.readouterr().out.splitlines()[0]
    assert "none is testable here" in first and "harmful 0/24" in first
    ok = reference.Conclusion(requires=(True, "the model refuses"))
    assert ok.add("a", "1.0", "x ≥ 0.5", False) == "does not hold"
