import pandas as pd
import pytest
import torch

from refusal_circuits.results import ResultsStore


def test_cached_computes_once(tmp_path):
    store = ResultsStore("m", root=tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return pd.DataFrame({"x": [1, 2]})

    a = store.cached("t", {"n": 2}, compute)
    b = store.cached("t", {"n": 2}, compute)
    assert calls == [1] and a.equals(b)
    store.cached("t", {"n": 3}, compute)  # other params, other key
    assert calls == [1, 1]
    assert store.path("t", {"n": 2}, ".json").exists()


def test_sweep_resumes_after_interruption(tmp_path):
    store = ResultsStore("m", root=tmp_path)
    seen = []

    def fn(i):
        if i == 3 and len(seen) < 10:
            seen.append("boom")
            raise KeyboardInterrupt
        seen.append(i)
        return pd.DataFrame({"item": [i], "sq": [i * i]})

    with pytest.raises(KeyboardInterrupt):
        store.sweep("s", {}, range(5), fn, progress=False)
    assert seen == [0, 1, 2, "boom"]
    seen += ["x"] * 10  # let item 3 through now
    out = store.sweep("s", {}, range(5), fn, progress=False)
    assert list(out["item"]) == [0, 1, 2, 3, 4]
    assert seen[-2:] == [3, 4]  # items 0-2 were not recomputed
    assert not list(tmp_path.rglob("*.parts"))


def test_tensor_roundtrip(tmp_path):
    store = ResultsStore("m", root=tmp_path)
    t = torch.arange(4.0)
    store.save_tensor("dir", {"a": 1}, t, layer=3)
    back, meta = store.load_tensor("dir", {"a": 1})
    assert torch.equal(back, t) and meta["layer"] == 3
    assert store.load_tensor("dir", {"a": 2}) is None


def test_weights_fingerprint_is_part_of_the_key(tmp_path):
    a = ResultsStore("m", root=tmp_path, fingerprint="adapter-v1")
    b = ResultsStore("m", root=tmp_path, fingerprint="adapter-v2")
    a.save("t", {"n": 1}, pd.DataFrame({"x": [1]}))
    assert a.load("t", {"n": 1}) is not None
    assert b.load("t", {"n": 1}) is None  # a retrained organism does not reuse old results


def test_checkpointed_parts_resume_and_equal_an_uninterrupted_run(tmp_path):
    from refusal_circuits.results import run_parts

    store = ResultsStore("m", root=tmp_path)
    fn = lambda i: pd.DataFrame({"item": [i], "name": [f"p{i}"], "x": [i / 3]})  # noqa: E731
    memory = run_parts(range(4), fn, None, progress=False)
    whole = run_parts(range(4), fn, store.checkpoint("a", {}), progress=False)
    pd.testing.assert_frame_equal(memory, whole, check_dtype=False)
    seen, state = [], {"die": True}

    def dying(i):
        seen.append(i)
        if i == 2 and state["die"]:
            raise RuntimeError("killed")
        return fn(i)

    with pytest.raises(RuntimeError):
        run_parts(range(4), dying, store.checkpoint("b", {}), progress=False)
    seen.clear()
    state["die"] = False
    resumed = run_parts(range(4), dying, store.checkpoint("b", {}), progress=False)
    assert seen == [2, 3]
    pd.testing.assert_frame_equal(resumed, whole)
    assert store.manifest("b", {})["parts_resumed"] == 2


def test_parts_of_another_plan_are_not_reused(tmp_path):
    store = ResultsStore("m", root=tmp_path)
    calls = []

    def fn(i):
        calls.append(i)
        if i == "c":
            raise RuntimeError("stop")
        return pd.DataFrame({"v": [i]})

    with pytest.raises(RuntimeError):
        store.sweep("s", {}, ["a", "b", "c"], fn, progress=False)
    calls.clear()
    out = store.sweep("s", {}, ["x", "b"], lambda i: fn(i), progress=False)  # other items, same name
    assert calls == ["x", "b"] and out.v.tolist() == ["x", "b"]


def test_save_returns_what_a_reload_gives(tmp_path):
    store = ResultsStore("m", root=tmp_path)
    df = pd.DataFrame({"a": ["x", "y"], "b": [1.0, 2.0]})
    saved = store.save("t", {}, df)
    pd.testing.assert_frame_equal(saved, store.load("t", {}))


def test_bumping_an_analysis_version_recomputes_its_stale_table(tmp_path, monkeypatch):
    """A fixed computation with unchanged parameters must not reuse the old table."""
    from refusal_circuits import results

    store = ResultsStore("m", root=tmp_path)
    calls = []

    def compute(value):
        calls.append(value)
        return pd.DataFrame({"x": [value]})

    assert store.cached("gaps", {"n": 3}, lambda: compute(1)).x.item() == 1
    assert store.cached("gaps", {"n": 3}, lambda: compute(2)).x.item() == 1  # same version: reused
    monkeypatch.setitem(results.ANALYSIS_VERSIONS, "gaps", 2)
    assert store.cached("gaps", {"n": 3}, lambda: compute(3)).x.item() == 3  # bumped: recomputed
    assert calls == [1, 3] and store.manifest("gaps", {"n": 3})["version"] == 2
    assert store.cached("toy", {"n": 3}, lambda: compute(4)).x.item() == 4  # other names keep their tables
    monkeypatch.setitem(results.ANALYSIS_VERSIONS, "gaps", 1)
    assert store.cached("gaps", {"n": 3}, lambda: compute(5)).x.item() == 1  # the v1 table is still there


def test_every_result_name_in_the_code_has_a_version():
    """A new analysis name must be added to ANALYSIS_VERSIONS (where its version is bumped later)."""
    import re
    from pathlib import Path

    from refusal_circuits import results
    from refusal_circuits.paths import NOTEBOOK_DIR

    root = Path(results.__file__).parent
    text = "".join(p.read_text() for p in [*root.glob("*.py"), *NOTEBOOK_DIR.glob("[0-9][0-9]_*.py")])
    names = set(re.findall(r'store\.(?:cached|checkpoint|sweep|save|load|save_tensor|load_tensor)\("([a-z_0-9]+)"', text))
    assert names and names <= set(results.ANALYSIS_VERSIONS), sorted(names - set(results.ANALYSIS_VERSIONS))
