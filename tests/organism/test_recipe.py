"""The organism's recipe: the committed adapter was trained with the current config."""
from refusal_circuits.organism import OrganismConfig


def test_committed_adapter_was_trained_with_the_current_recipe():
    """`data/organism/training_config.json` records the config the committed adapter was trained with;
    it must equal today's `OrganismConfig()`, or `make organism` would not reproduce the adapter."""
    import json
    from dataclasses import asdict

    from refusal_circuits.paths import ORGANISM_DIR

    recorded = json.loads((ORGANISM_DIR / "training_config.json").read_text())
    current = json.loads(json.dumps(asdict(OrganismConfig())))  # tuples -> lists, as recorded
    assert {k: recorded.get(k) for k in current} == current
