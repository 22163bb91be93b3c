"""The committed notebooks and the documentation: clean outputs, shared stages, links inside the repo."""
import json
import re

import pytest

from refusal_circuits.paths import DOCS_DIR, NOTEBOOK_DIR, REPO_ROOT

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
#: the committed executed copies on other models (make figures MODEL=...); tiny-* runs are build outputs
EXECUTED = sorted(p for p in REPO_ROOT.glob("figures/*/notebooks/[0-9][0-9]_*.ipynb")
                  if not p.parts[-3].startswith("tiny-"))
SHOWN = NOTEBOOKS + EXECUTED
BAR = re.compile(r"\d+%\|")


def _cells(path):
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", SHOWN, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_stored_outputs_hold_no_progress_bars_or_warnings(path):
    for i, cell in enumerate(_cells(path)):
        for out in cell.get("outputs", []):
            text = "".join(out.get("text", "")) if out.get("output_type") == "stream" else ""
            assert not BAR.search(text), f"{path.name} cell {i}: progress-bar text {text[:80]!r}"
            assert "Warning" not in text, f"{path.name} cell {i}: warning text {text[:120]!r}"
            assert "Traceback" not in text, f"{path.name} cell {i}: a logged traceback {text[:120]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_have_a_parameters_cell_and_take_reference_numbers_from_the_table(path):
    cells = _cells(path)
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and "MODEL" in "".join(params[0]["source"])
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code" and c not in params)
    # reference numbers belong in data/reference_numbers.csv, printed with rc.reference.show / value
    assert not re.search(r"print\(\s*f?[\"']reference", code), path.name
    assert "gemma-2b-it" not in code, f"{path.name}: a reference model's number written into a cell"


def test_later_notebooks_get_the_direction_from_its_stage_with_its_own_defaults():
    from refusal_circuits import direction
    banned = ["candidate_directions", "select_direction"]   # computing a direction outside its stage
    assert all(callable(getattr(direction, name)) for name in banned)  # the ban names real functions
    calls = {}
    for path in NOTEBOOKS:
        code = "\n".join("".join(c["source"]) for c in _cells(path) if c["cell_type"] == "code")
        assert not [name for name in banned if re.search(rf"\b{name}\(", code)], path.name
        calls[path.name] = re.findall(r"stages\.refusal_direction\(([^)]*)\)", code)
    users = {k: v for k, v in calls.items() if v}
    assert "02_refusal_direction.ipynb" in users and "03_patching.ipynb" in users
    for name, args in users.items():
        assert all(a.replace(" ", "") in ("model", "model,store") for a in args), (name, args)


def _link_targets(text):
    return re.findall(r"\]\(([^)#\s]+)", text)


@pytest.mark.parametrize("doc", ["README.md", "docs/methods.md", "data/README.md"])
def test_documentation_links_stay_inside_the_repository(doc):
    path = REPO_ROOT / doc
    text = path.read_text()
    assert "../shared" not in text
    for target in _link_targets(text):
        if target.startswith(("http://", "https://")):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(REPO_ROOT) and resolved.exists(), f"{doc}: broken link {target}"


def test_docstrings_point_inside_the_repository():
    for py in (REPO_ROOT / "lib").rglob("*.py"):
        assert "../shared" not in py.read_text() and "methods.md`` of the project workspace" not in py.read_text(), py
    assert (DOCS_DIR / "methods.md").exists()


@pytest.mark.parametrize("path", SHOWN, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_figure_shows_as_an_image_without_javascript(path):
    """What nbviewer or a code host shows: nbconvert's HTML with no JavaScript has one PNG per figure."""
    from nbconvert import HTMLExporter

    figures = sum("application/vnd.plotly.v1+json" in out.get("data", {})
                  for cell in _cells(path) for out in cell.get("outputs", []))
    html, _ = HTMLExporter().from_filename(str(path))
    assert figures > 0 and html.count('src="data:image/png') == figures, (path.name, figures)
