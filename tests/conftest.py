import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

torch.set_num_threads(1)  # as every rank of a test under torchrun (OMP_NUM_THREADS=1): the same sums


@pytest.fixture(scope="session")
def hellaswag_val():
    """300 HellaSwag validation tasks, committed (tests/data/README.md): no network needed."""
    return os.path.join(ROOT, "tests", "data", "hellaswag_val_300.jsonl")


@pytest.fixture(scope="session")
def shakespeare_text():
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
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
