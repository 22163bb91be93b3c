import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # make test's lanes run one thread each

TINY = ["tiny-gemma-2l", "tiny-gemma2-2l", "tiny-llama-2l", "tiny-qwen2-2l", "tiny-qwen3-2l", "tiny-phi3-2l", "tiny-mistral-2l",
        "tiny-glm4-2l"]


@pytest.fixture(scope="session")
def organism():
    from refusal_circuits import load_model

    return load_model("smollm2-135m-refusal", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama():
    from refusal_circuits import load_model

    return load_model("tiny-llama-2l", device="cpu")


@pytest.fixture(scope="session", params=TINY)
def tiny_model(request):
    from refusal_circuits import load_model

    return load_model(request.param, device="cpu")
