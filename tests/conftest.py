import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

TINY = ["tiny-gemma", "tiny-gemma2", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-mistral",
        "tiny-glm4"]


@pytest.fixture(scope="session")
def organism():
    from refusal_circuits import load_model

    return load_model("smollm2-135m-refusal", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama():
    from refusal_circuits import load_model

    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="session", params=TINY)
def tiny_model(request):
    from refusal_circuits import load_model

    return load_model(request.param, device="cpu")
