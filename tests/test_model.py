"""The model is exactly GPT-2: compared with Hugging Face's GPT2LMHeadModel, not with itself."""
import math

import pytest
import torch

from train_gpt2 import GPT, GPTConfig


def hf_model(path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path).eval()


def max_logit_diff(ours, hf, idx):
    with torch.no_grad():
        a, _ = ours(idx)
        b = hf(idx).logits
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_logits_equal_hf_tiny(tiny_hf_dir):
    ours = GPT.from_pretrained(tiny_hf_dir).eval()
    assert ours.config.padded_vocab_size == 50304
    idx = torch.randint(0, 50257, (3, 100), generator=torch.Generator().manual_seed(0))
    diff = max_logit_diff(ours, hf_model(tiny_hf_dir), idx)
    print(f"tiny: max |logit diff| vs HF = {diff:.3e}")
    assert diff < 1e-4


def test_logits_equal_hf_124m():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # the 124M shapes, random weights (from_pretrained: the tiny test)
    ours = GPT.from_hf(hf).eval()
    assert ours.config == GPTConfig()  # the defaults are GPT-2 124M
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(0))
    diff = max_logit_diff(ours, hf, idx)
    print(f"124M: max |logit diff| vs HF = {diff:.3e}")
    assert diff < 1e-4


def test_greedy_generation_equals_hf(tiny_hf_dir):
    ours = GPT.from_pretrained(tiny_hf_dir).eval()
    hf = hf_model(tiny_hf_dir)
    prompt = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11]])
    want = hf.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=50256)
    got = ours.generate(prompt, 40, temperature=0)
    assert got.tolist() == want.tolist()


def test_export_hf_round_trip(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    ours.export_hf(str(tmp_path / "export"))
    hf = hf_model(str(tmp_path / "export"))
    assert hf.config.vocab_size == 50257  # padded rows dropped
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(1))
    assert max_logit_diff(ours, hf, idx) < 1e-4
    prompt = idx[:1, :4]
    assert hf.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=50256).tolist() == \
        ours.generate(prompt, 30, temperature=0).tolist()
    # and back again into our class
    again = GPT.from_pretrained(str(tmp_path / "export")).eval()
    assert max_logit_diff(again, hf, idx) < 1e-4


def test_from_pretrained_rejects_wrong_shapes(tiny_hf_dir, tmp_path):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_hf_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["n_positions"] = 256  # the weights have 128 position rows
    (bad / "config.json").write_text(json.dumps(cfg))
    from train_gpt2 import UserError, load_model

    with pytest.raises(UserError, match=f"cannot load model '{bad}'") as e:  # transformers' check, on one line
        load_model(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="cannot load model"):
        load_model(str(tmp_path / "nope"))


def test_initial_loss_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (2, 128), generator=g)
    y = torch.randint(0, 50257, (2, 128), generator=g)
    with torch.no_grad():
        logits, loss = model(x, y)
    assert logits.shape == (2, 128, 50257)  # every position, real vocabulary only
    assert abs(loss.item() - math.log(50257)) < 0.3


def test_init_statistics():
    cfg = GPTConfig(n_layer=8, n_head=4, n_embd=256)
    torch.manual_seed(0)
    m = GPT(cfg)
    assert m.lm_head.weight is m.transformer.wte.weight
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(m.transformer.h[0].attn.c_proj.weight.std().item() - proj_std) < 0.1 * proj_std
    assert m.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0


def test_sequence_longer_than_block_size_is_an_error():
    m = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="block_size 16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (4, 32), generator=g)
    y = torch.randint(0, 50257, (4, 32), generator=g)
    opt = m.configure_optimizer(weight_decay=0.0, learning_rate=1e-2, device_type="cpu")
    for _ in range(60):
        _, loss = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_kv_cache_generation_equals_recompute():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=24, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 50257, (3, 7))
    # 40 new tokens run past block_size, so the crop-and-rebuild path is covered too
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=50), dict(temperature=0.8)):
        out = m.generate(prompt, 40, generator=torch.Generator().manual_seed(42), **kwargs)
        g, idx = torch.Generator().manual_seed(42), prompt
        with torch.no_grad():
            for _ in range(40):  # the same sampling, each token from a full forward pass of the context
                logits = m(idx[:, -24:])[0][:, -1, :].float()
                if kwargs["temperature"] == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / kwargs["temperature"]
                    if "top_k" in kwargs:
                        kth = torch.topk(logits, kwargs["top_k"]).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
                idx = torch.cat([idx, nxt], dim=1)
        assert out.tolist() == idx.tolist(), kwargs
        assert out.max().item() < 50257  # padded ids never come out


def test_padded_ids_never_sampled():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():  # make the padded rows irresistible: they must still never be chosen
        m.lm_head.weight[50257:] = 100.0
    g = torch.Generator().manual_seed(0)
    out = m.generate(torch.zeros(4, 1, dtype=torch.long), 10, temperature=1.0, generator=g)
    assert out.max().item() < 50257
    logits, _ = m(out[:, :16])
    assert logits.size(-1) == 50257


def test_params_and_flops():
    m = GPT(GPTConfig())
    # 124M with the padded table (124,439,808 with 50257 rows, the number usually quoted)
    assert m.num_params() == 124_475_904
    assert m.num_params() - m.num_params(include_position_embeddings=False) == 1024 * 768
    n = m.num_params(include_position_embeddings=False)
    assert m.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024


def test_loss_ignores_padding_targets_and_skips_the_logits():
    """The loss is the mean over targets that are not -1, in fp32; training asks for no logits."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 50257, (3, 16), generator=g), torch.randint(0, 50257, (3, 16), generator=g)
    y[:, ::3] = -1
    logits, loss = m(x, y)
    keep = y != -1
    assert torch.allclose(loss, F.cross_entropy(logits[keep], y[keep]))
    assert m(x, y, return_logits=False)[0] is None


def test_compiles_without_graph_breaks():
    """torch.compile sees the training forward (and loss) as one graph: no graph break."""
    import torch._dynamo

    m = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    x = torch.randint(0, 50257, (2, 16))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(m)(x, x, return_logits=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_dropout_only_in_training(tmp_path):
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    dropped = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.2))
    dropped.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # evaluation (validation, HellaSwag, sampling) never drops anything
        assert torch.equal(plain.eval()(idx)[0], dropped.eval()(idx)[0])
        # with p = 0 training mode is evaluation mode
        assert torch.equal(plain.train()(idx)[0], plain.eval()(idx)[0])
        dropped.train()
        a, b = dropped(idx)[0], dropped(idx)[0]
    assert not torch.equal(a, b)  # a fresh mask each forward pass
    assert not torch.allclose(a, plain(idx)[0], atol=1e-3)
    # the exported Hugging Face model trains with the same dropout
    from transformers import GPT2Config

    hf = GPT2Config.from_pretrained(dropped.export_hf(str(tmp_path / "export")))
    assert hf.resid_pdrop == hf.embd_pdrop == hf.attn_pdrop == 0.2
