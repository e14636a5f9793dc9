"""hellaswag.py: the batched scorer gives the predictions of scoring each example alone with Hugging
Face's GPT2LMHeadModel; the CLI, checkpoints and two ranks give the same; bad data is reported."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import hellaswag
import train_gpt2 as tg
from fineweb import gpt2_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_EXAMPLES = 240  # scored in-process against Hugging Face
N_CLI = 60  # scored again through the CLI (model, checkpoint, two ranks)


def run_cli(*args, env=None, torchrun=False):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd + [os.path.join(ROOT, "hellaswag.py"), *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def hf_dir_512(tmp_path_factory):
    """Random-weights Hugging Face GPT-2 with 512 positions: every packed HellaSwag row fits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4321)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=512, vocab_size=50257))
    d = tmp_path_factory.mktemp("hf_512")
    hf.save_pretrained(d)
    return str(d)


@torch.no_grad()
def hf_losses(hf_path, examples):
    """(n, 4) summed and mean cross-entropy per ending, the plain way: one forward pass per example
    of four rows "context + ending" (right-padded, which a causal model cannot see), with Hugging
    Face's model and our own arithmetic on its logits."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_path).eval()
    enc = gpt2_tokenizer()
    sums, means = torch.zeros(len(examples), 4), torch.zeros(len(examples), 4)
    for n, ex in enumerate(examples):
        ctx = enc.encode(ex["ctx"])
        ends = [enc.encode(" " + ending) for ending in ex["endings"]]
        T = len(ctx) + max(map(len, ends))
        rows = torch.tensor([ctx + e + [0] * (T - len(ctx) - len(e)) for e in ends])
        logprobs = torch.log_softmax(hf(rows).logits.float(), -1)
        for i, end in enumerate(ends):
            rows = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(end))  # the positions predicting the ending
            nll = -logprobs[i, rows, torch.tensor(end)]
            sums[n, i], means[n, i] = nll.sum(), nll.mean()
    return sums, means


@pytest.fixture(scope="module")
def reference(hellaswag_val, hf_dir_512):
    examples = hellaswag.load_examples(hellaswag_val, limit=N_EXAMPLES)
    sums, means = hf_losses(hf_dir_512, examples)
    return examples, sums, means


def check_same(result, sums, means):
    assert result["n"] == len(sums)
    assert result["sum_loss"].argmin(1).tolist() == sums.argmin(1).tolist()
    assert result["mean_loss"].argmin(1).tolist() == means.argmin(1).tolist()
    torch.testing.assert_close(result["sum_loss"], sums, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(result["mean_loss"], means, atol=1e-4, rtol=1e-5)


# -----------------------------------------------------------------------------------------------
# Scoring equals the per-example computation


@pytest.mark.parametrize("batch_size", [1, 7, 32])
def test_evaluate_equals_hf_per_example(reference, hf_dir_512, batch_size):
    from train_gpt2 import GPT

    examples, sums, means = reference
    model = GPT.from_pretrained(hf_dir_512).eval()
    result = hellaswag.evaluate(model, examples, device="cpu", batch_size=batch_size)
    check_same(result, sums, means)
    labels = torch.tensor([ex["label"] for ex in examples])
    assert result["correct"] == (sums.argmin(1) == labels).sum().item()
    assert result["correct_norm"] == (means.argmin(1) == labels).sum().item()
    assert result["acc"] == result["correct"] / len(examples)
    assert [p["pred_norm"] for p in result["predictions"]] == means.argmin(1).tolist()
    print(f"random model, {len(examples)} examples: acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f}")


def test_rows_longer_than_block_size_are_split(hellaswag_val, tiny_hf_dir):
    """With 128 positions most examples' four endings do not fit in one row with the context: they
    continue on further rows (the context repeated); the numbers stay those of one-by-one scoring."""
    from train_gpt2 import GPT

    enc = gpt2_tokenizer()
    examples = hellaswag.load_examples(hellaswag_val, limit=80)
    fits = lambda ex: len(enc.encode(ex["ctx"])) + max(len(enc.encode(" " + e)) for e in ex["endings"]) <= 128
    examples = [ex for ex in examples if fits(ex)]
    model = GPT.from_pretrained(tiny_hf_dir).eval()
    packed = hellaswag.pack([hellaswag.render_example(ex) for ex in examples], block_size=128)
    assert packed.idx.size(0) > len(examples) and packed.idx.size(1) <= 128
    result = hellaswag.evaluate(model, examples, device="cpu", batch_size=16)
    check_same(result, *hf_losses(tiny_hf_dir, examples))


@torch.no_grad()
def hf_cropped_losses(hf_path, examples, block_size):
    """(n, 4) summed and mean losses, cropped the way lm-evaluation-harness crops a request longer than
    the model: per ending, the model reads the last block_size + 1 tokens of context + ending (minus
    the last), and the ending tokens among the predicted ones are scored. One ending at a time."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_path).eval()
    enc = gpt2_tokenizer()
    sums, means = torch.zeros(len(examples), 4), torch.zeros(len(examples), 4)
    for n, ex in enumerate(examples):
        ctx = enc.encode(ex["ctx"])
        for i, ending in enumerate(ex["endings"]):
            end = enc.encode(" " + ending)
            window = (ctx + end)[-(block_size + 1):]
            scored = min(len(end), len(window) - 1)
            logprobs = torch.log_softmax(hf(torch.tensor([window[:-1]])).logits[0].float(), -1)
            rows = torch.arange(len(window) - 1 - scored, len(window) - 1)
            nll = -logprobs[rows, torch.tensor(window[-scored:])]
            sums[n, i], means[n, i] = nll.sum(), nll.mean()
    return sums, means


def test_examples_longer_than_block_size_are_cropped_from_the_left(hellaswag_val, tmp_path):
    """A 32-position model: most examples are longer (some endings too), a few fit. Scores equal an
    independent one-ending-at-a-time computation with lm-evaluation-harness's cropping."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from train_gpt2 import GPT

    torch.manual_seed(99)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    examples = hellaswag.load_examples(hellaswag_val, limit=40)
    enc = gpt2_tokenizer()
    length = lambda ex: len(enc.encode(ex["ctx"])) + max(len(enc.encode(" " + e)) for e in ex["endings"])
    too_long = [length(ex) > 33 for ex in examples]
    assert 20 <= sum(too_long) < len(examples)  # most are cropped, not all
    assert any(len(enc.encode(" " + e)) > 32 for ex in examples for e in ex["endings"])  # an ending too
    result = hellaswag.evaluate(model, examples, device="cpu", batch_size=8)
    assert result["cropped"] == sum(too_long)
    check_same(result, *hf_cropped_losses(str(tmp_path), examples, block_size=32))


def test_rendering_and_mask():
    enc = gpt2_tokenizer()
    example = {"ctx": "A man is sitting on a roof. he", "label": 3,
               "endings": ["is using wrap.", "is ripping tiles off.", "is holding a cube.",
                           "starts pulling up roofing."]}
    r = hellaswag.render_example(example)
    assert r.ctx == enc.encode("A man is sitting on a roof. he") and r.label == 3
    assert r.endings[1] == enc.encode(" is ripping tiles off.")
    from bench.hellaswag import rows

    tokens, mask = rows(r)  # the straightforward layout that bench/hellaswag.py scores
    for i, end in enumerate(r.endings):
        row = r.ctx + end
        assert tokens[i, : len(row)].tolist() == row and tokens[i, len(row) :].eq(0).all()
        assert mask[i].tolist() == [0] * len(r.ctx) + [1] * len(end) + [0] * (tokens.size(1) - len(row))
    # packed: context once, then the endings but their last tokens, positions restarting after the context
    p = hellaswag.pack([r], block_size=1024)
    L, m0 = len(r.ctx), len(r.endings[0]) - 1
    assert p.idx[0].tolist() == r.ctx + sum((end[:-1] for end in r.endings), [])
    assert p.pos[0, L : L + m0 + 2].tolist() == list(range(L, L + m0)) + [L, L + 1]
    assert p.target.tolist() == sum(r.endings, [])
    # position L - 1 (the context's last token) predicts the first token of every ending
    firsts = [sum(map(len, r.endings[:i])) for i in range(4)]
    assert all(p.src_col[p.pred[j]] == L - 1 for j in firsts)
    assert p.src_col[p.pred[1:m0 + 1]].tolist() == list(range(L, L + m0))
    m = hellaswag.attention_mask(p.segment)[0, 0]  # (T, T)
    e1 = L + m0  # first token of ending 1
    assert m[e1, :L].all() and not m[e1, L:e1].any() and m[e1, e1] and not m[e1, e1 + 1 :].any()


# -----------------------------------------------------------------------------------------------
# Command line: model directory, checkpoint, two ranks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, hf_dir_512):
    from train_gpt2 import GPT

    model = GPT.from_pretrained(hf_dir_512)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pt")
    # a checkpoint of train_gpt2.py's format around this model, at step 0 (nothing to resume)
    torch.save({"format": tg.CHECKPOINT_FORMAT, "version": tg.CHECKPOINT_VERSION, "step": 0,
                "model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "optimizer": {"state": {}, "param_groups": []}, "train_loader": {"position": 0},
                "rng": [tg.rng_state("cpu")], "world_size": 1, "run_config": {}}, path)
    return path


def cli_predictions(tmp_path, name, *args, torchrun=False):
    out = str(tmp_path / f"{name}.json")
    proc = run_cli(*args, "--out", out, "--device", "cpu", "--dtype", "fp32", "--batch-size", "8", torchrun=torchrun)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        record = json.load(f)
    return record, proc


def test_cli_model_dir_and_checkpoint(reference, hf_dir_512, checkpoint, hellaswag_val, tmp_path):
    examples, sums, means = reference
    want_pred, want_norm = sums[:N_CLI].argmin(1).tolist(), means[:N_CLI].argmin(1).tolist()
    data = ["--data", hellaswag_val, "--limit", str(N_CLI)]
    for name, source in (("hf", ["-m", hf_dir_512]), ("ckpt", ["--checkpoint", checkpoint])):
        record, proc = cli_predictions(tmp_path, name, *source, *data)
        assert record["n"] == N_CLI
        assert [p["pred"] for p in record["predictions"]] == want_pred
        assert [p["pred_norm"] for p in record["predictions"]] == want_norm
        assert [p["label"] for p in record["predictions"]] == [ex["label"] for ex in examples[:N_CLI]]
        summary = proc.stdout.strip().splitlines()[-1]
        assert summary == f"hellaswag val: n={N_CLI} acc={record['acc']:.4f} acc_norm={record['acc_norm']:.4f}"


def test_two_ranks_equal_one_process(checkpoint, hellaswag_val, tmp_path):
    data = ["--checkpoint", checkpoint, "--data", hellaswag_val, "--limit", str(N_CLI)]
    one, _ = cli_predictions(tmp_path, "one", *data)
    two, proc = cli_predictions(tmp_path, "two", *data, torchrun=True)
    for key in ("n", "correct", "correct_norm", "acc", "acc_norm", "predictions"):
        assert two[key] == one[key], key
    assert proc.stdout.count("hellaswag val:") == 1  # rank 0 alone reports


# -----------------------------------------------------------------------------------------------
# Data: download, bad files, errors


def test_download_to_cache_and_offline_error(hellaswag_val, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HELLASWAG_CACHE", str(cache))
    url = "file://" + os.path.join(os.path.dirname(hellaswag_val), "hellaswag_{split}.jsonl")
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", url)
    examples = hellaswag.load_examples(None, split="val", limit=5)
    assert len(examples) == 5 and examples[0]["ind"] == 0
    assert sorted(os.listdir(cache)) == ["hellaswag_val.jsonl"]  # renamed into place, no temporary left
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_{split}.jsonl")
    assert len(hellaswag.load_examples(None, split="val", limit=5)) == 5  # cached: no download
    with pytest.raises(hellaswag.HellaSwagError, match=r"cannot download http://127.0.0.1:9/hellaswag_train.jsonl"):
        hellaswag.load_examples(None, split="train")
    assert sorted(os.listdir(cache)) == ["hellaswag_val.jsonl"]


GOOD = {"ctx": "A man is sitting on a roof. he", "label": 0, "endings": ["a", "b", "c", "d"]}


@pytest.mark.parametrize("bad_line, message", [
    ('{"ctx": "x", "label": 0, "endings": ["a", "b"', "not valid JSON"),
    (json.dumps({**GOOD, "label": 4}), "'label' must be an integer 0..3, got 4"),
    (json.dumps({**GOOD, "label": "1"}), "'label' must be an integer"),
    (json.dumps({**GOOD, "endings": ["a", "b", "c"]}), "'endings' must be a list of 4 strings"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "ctx"}), "'ctx' must be a non-empty string"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "label"}), "no 'label'"),
])
def test_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), json.dumps(GOOD), bad_line, json.dumps(GOOD)]) + "\n")
    with pytest.raises(hellaswag.HellaSwagError) as e:
        hellaswag.load_examples(str(path))
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)
    assert len(hellaswag.load_examples(str(path), limit=2)) == 2  # the lines before it are fine


def test_cli_errors_are_one_line(tmp_path, hf_dir_512, hellaswag_val):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text(json.dumps({**GOOD, "label": 7}) + "\n")
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a checkpoint at all")
    data = ["--data", hellaswag_val, "--limit", "2"]
    cases = [
        (["-m", hf_dir_512, "--data", str(bad_data)], f"{bad_data}:1: 'label' must be an integer 0..3, got 7"),
        (["-m", hf_dir_512, "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--checkpoint", str(bad_ckpt), *data], "not a readable checkpoint"),
        (["--checkpoint", str(tmp_path / "missing.pt"), *data], "no such checkpoint file"),
        (["-m", "not-a-gpt2-model", *data], "cannot load model 'not-a-gpt2-model'"),
        (["-m", hf_dir_512, "--data", hellaswag_val, "--limit", "-1"],
         "argument --limit: must be an integer of at least 0, got -1"),
        (["-m", hf_dir_512, *data, "--batch-size", "0"],
         "argument --batch-size: must be an integer of at least 1, got 0"),
        (["-m", hf_dir_512, *data, "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["-m", hf_dir_512, *data, "--device", "tpu"], "--device tpu: use auto, cpu, cuda, cuda:N or mps"),
    ]
    for args, message in cases:
        proc = run_cli(*args)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hellaswag.py: error: ") and message in lines[0], proc.stderr


def test_import_does_nothing(tmp_path):
    code = "import sys, hellaswag; assert 'transformers' not in sys.modules; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
