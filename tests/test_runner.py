"""``make figures``: the model is checked before papermill starts; a failing notebook is reported in a
few lines and leaves its target untouched; progress bars stay out of the executed notebooks; notebooks
are executed from their ``.py`` sources and a source that disagrees with its notebook is found."""
import json

import jupytext
import nbformat
import pytest

from refusal_circuits import runner


def _notebook(path, code):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('MODEL = "smollm2-135m-refusal"\nDEVICE = "cpu"\nDTYPE = "float32"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in code]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, path.with_suffix(".py"), fmt="py:percent")  # only the source: the runner builds the rest


@pytest.fixture
def project(tmp_path, monkeypatch):
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    monkeypatch.setattr(runner, "NOTEBOOK_DIR", nbs)
    monkeypatch.setattr(runner, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("REFUSAL_FIGURES_DIR", str(tmp_path / "figures"))
    return tmp_path


def test_missing_model_stops_before_papermill(project, capsys):
    _notebook(project / "notebooks" / "01_x.ipynb", ["print(1)"])
    assert runner.main(["--model", "nobody/nothing-here"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "huggingface-cli download nobody/nothing-here" in err[0]
    assert not (project / "build").exists()  # papermill never started


def test_failing_notebook_is_reported_and_its_target_left_alone(project, capsys):
    _notebook(project / "notebooks" / "01_ok.ipynb",
              ["import os; print('progress', os.environ['REFUSAL_PROGRESS'])"])
    _notebook(project / "notebooks" / "02_bad.ipynb", ["x = 1", "1 / 0"])
    assert runner.main(["--model", "tiny-llama"]) == 1
    err = capsys.readouterr().err
    assert "02_bad.ipynb failed in cell 2" in err and "ZeroDivisionError: division by zero" in err
    partial = project / "build" / "notebooks" / "tiny-llama" / "02_bad.ipynb"
    assert str(partial) in err and partial.exists()
    assert len(err.strip().splitlines()) == 2
    out = project / "figures" / "tiny-llama" / "notebooks"
    assert not (out / "02_bad.ipynb").exists()
    ok = json.loads((out / "01_ok.ipynb").read_text())
    printed = "".join("".join(o.get("text", "")) for c in ok["cells"] for o in c.get("outputs", []))
    assert "progress 0" in printed  # the kernels run with progress bars off


def test_notebooks_execute_from_their_source_and_pairs_are_checked(project, capsys):
    nb = project / "notebooks" / "01_ok.ipynb"
    _notebook(nb, ["# %load_ext autoreload\nx = 41", "print(x + 1)"])
    assert runner.source_mismatches(nb) == ["01_ok.ipynb: not executed yet (make figures NOTEBOOK=01)"]
    assert runner.main(["--model", "tiny-llama"]) == 0
    executed = project / "figures" / "tiny-llama" / "notebooks" / "01_ok.ipynb"
    assert "42" in executed.read_text()
    src = nb.with_suffix(".py")
    assert runner.source_mismatches(executed, src) == []  # papermill's injected cell is not a difference
    src.write_text(src.read_text().replace("print(x + 1)", "print(x + 2)"))
    assert runner.source_mismatches(executed, src) == [
        "01_ok.ipynb: cell 2 ('print(x + 2)') differs from its source in text"]
    src.write_text(src.read_text() + "\n# %%\nprint(3)\n")
    assert "01_ok.ipynb: 3 cells, its source has 4" in runner.source_mismatches(executed, src)


def test_committed_notebooks_agree_with_their_sources():
    from refusal_circuits.paths import NOTEBOOK_DIR
    found = runner.notebooks()
    assert [p.name[:2] for p in found] == ["01", "02", "03", "04", "05", "06", "07"]
    assert sorted(NOTEBOOK_DIR.glob("*.ipynb")) == found  # no notebook without a source
    problems = [msg for nb in found for msg in runner.source_mismatches(nb)]
    assert not problems, "edit the .py source and run `make figures NOTEBOOK=NN`:\n" + "\n".join(problems)
