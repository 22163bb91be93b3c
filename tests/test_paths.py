"""Repository paths and model slugs: one home for both."""
import pytest

from refusal_circuits import paths
from refusal_circuits.models import ChatModel


def test_repository_folders_exist():
    for p in (paths.DATA_DIR, paths.NOTEBOOK_DIR, paths.ORGANISM_DIR, paths.DOCS_DIR):
        assert p.is_dir(), p
    assert (paths.REPO_ROOT / "pyproject.toml").exists() and paths.REFERENCE_TABLE.exists()


def test_output_folders_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_RESULTS_DIR", str(tmp_path / "r"))
    monkeypatch.setenv("REFUSAL_FIGURES_DIR", str(tmp_path / "f"))
    assert paths.results_dir() == tmp_path / "r" and paths.figures_dir() == tmp_path / "f"
    monkeypatch.delenv("REFUSAL_RESULTS_DIR")
    assert paths.results_dir() == paths.REPO_ROOT / "results"


@pytest.mark.parametrize("name,expected", [
    ("google/gemma-2b-it", "google--gemma-2b-it"), ("smollm2-135m-refusal", "smollm2-135m-refusal"),
    ("/models/my model/", "models--my--model"), ("Qwen/Qwen2.5-7B-Instruct", "Qwen--Qwen2.5-7B-Instruct"),
])
def test_slug(name, expected):
    assert paths.slug(name) == expected


def test_model_slug_is_the_paths_slug():
    m = ChatModel(name="google/gemma-2b-it", bridge=None, tokenizer=None, refusal_token_ids=[1], refusal_token_id=1)
    assert m.slug == paths.slug(m.name)
    with pytest.raises(ValueError, match="empty"):
        paths.slug("  ")
