"""nbval over the notebooks in two lanes (``make nbval`` runs ``pytest -n 2 --dist loadgroup``).

Notebooks 06 and 07 share the gate screen (07 reads what 06 computes), so they run in one lane, in
order; 01-05 share the refusal direction and the transfer stage (02 and 03 compute them first) and run
in the other. Without xdist the marks do nothing and the notebooks run in order."""
import pytest

LANES = {"06": "gate", "07": "gate"}


def pytest_collection_modifyitems(items):
    for item in items:
        name = item.path.name
        if name.endswith(".ipynb") and name[:2].isdigit():
            item.add_marker(pytest.mark.xdist_group(LANES.get(name[:2], "write-up")))
