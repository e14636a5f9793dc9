import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.fail(f"{SHARED_DATA} not found: the tests need ../shared/data beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shakespeare_text(shared_data):
    with open(os.path.join(shared_data, "tinyshakespeare.txt"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A Hugging Face GPT-2 with random weights, saved to a temporary folder (the offline stand-in for
    OpenAI's checkpoint: same format, same code path)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257))
    d = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(d)
    return str(d)
