"""The refusal "model organism": SmolLM2-135M-Instruct with our LoRA refusal fine-tune.

This subpackage *trains*, evaluates and documents the organism (``make organism``,
``make organism-check``). It sits above the analysis core: it imports the core, and nothing in the
core imports it. *Loading* the committed adapter is model loading and lives in
:func:`refusal_circuits.models.load_model` (``smollm2-135m-refusal``).

* :mod:`.recipe` -- :class:`OrganismConfig` and the refusals it teaches;
* :mod:`.training` -- the training set, the reply loss, LoRA training, :func:`train_organism`;
* :mod:`.evaluation` -- the held-out evaluation and :func:`compare_organisms`;
* :mod:`.card` -- the model card ``data/organism/README.md``.
"""

from .evaluation import compare_organisms, evaluate
from .recipe import REFUSALS, OrganismConfig
from .training import (attach_lora, build_training_set, encode_training_set, reply_loss,
                       shared_prefix_length, train_lora, train_organism)

__all__ = ["OrganismConfig", "REFUSALS", "attach_lora", "build_training_set", "compare_organisms",
           "encode_training_set", "evaluate", "reply_loss", "shared_prefix_length", "train_lora",
           "train_organism"]
