"""hellaswag.py: the batched scorer gives the losses of scoring each ending alone with Hugging Face's
GPT2LMHeadModel (examples that fit in one row, that need a row per ending, that are cropped); the
command line and two ranks give the same predictions; bad data and flags are one-line errors."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import hellaswag
import train_gpt2 as tg
from fineweb import UserError, gpt2_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK_SIZE = 48  # of the examples below, 5 fit in one row, 12 need a row per ending, 22 are cropped


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread does as well, and far better than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sample(hellaswag_val, tmp_path_factory):
    """39 examples, short (the file's first, ActivityNet) and long (its last 15, WikiHow), as a file."""
    with open(hellaswag_val) as f:
        lines = f.readlines()
    path = tmp_path_factory.mktemp("data") / "sample.jsonl"
    path.write_text("".join(lines[:24] + lines[-15:]))
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(99)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK_SIZE, vocab_size=50257)
    path = tmp_path_factory.mktemp("hf")
    GPT2LMHeadModel(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
@torch.no_grad()
def reference(sample, hf_dir):
    """(n, 4) summed and mean cross-entropy, one ending at a time with Hugging Face's model, cropped
    as lm-evaluation-harness crops a request longer than the model: it reads the last block_size + 1
    tokens of context + ending (minus the last), and the ending tokens among those are scored."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    enc = gpt2_tokenizer()
    examples = hellaswag.load_examples(sample)
    sums, means = torch.zeros(len(examples), 4), torch.zeros(len(examples), 4)
    for n, ex in enumerate(examples):
        ctx = enc.encode(ex["ctx"])
        for i, ending in enumerate(ex["endings"]):
            end = enc.encode(" " + ending)
            window = (ctx + end)[-(BLOCK_SIZE + 1) :]
            scored = min(len(end), len(window) - 1)
            logits = hf(torch.tensor([window[:-1]])).logits[0, -scored:]  # the positions predicting the ending
            nll = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(window[-scored:]), reduction="none")
            sums[n, i], means[n, i] = nll.sum(), nll.mean()
    return examples, sums, means


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_scores_equal_hf_one_ending_at_a_time(reference, hf_dir, batch_size):
    examples, sums, means = reference
    enc = gpt2_tokenizer()
    rendered = [hellaswag.render_example(ex) for ex in examples]
    assert rendered[0] == (enc.encode(examples[0]["ctx"]), [enc.encode(" " + e) for e in examples[0]["endings"]])
    one_row = sum(len(ctx) + sum(len(e) - 1 for e in ends) <= BLOCK_SIZE for ctx, ends in rendered)
    cropped = sum(len(ctx) + max(map(len, ends)) > BLOCK_SIZE + 1 for ctx, ends in rendered)
    assert (one_row, cropped) == (5, 22)  # and 12 with a row per ending
    assert any(len(e) > BLOCK_SIZE for _, ends in rendered for e in ends)  # an ending cropped too

    model = tg.GPT.from_pretrained(hf_dir)
    result = hellaswag.evaluate(model, examples, device="cpu", batch_size=batch_size)
    assert result["n"] == len(examples) and result["cropped"] == cropped
    torch.testing.assert_close(result["sum_loss"], sums, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(result["mean_loss"], means, atol=1e-4, rtol=1e-5)
    labels = torch.tensor([ex["label"] for ex in examples])
    assert [p["pred"] for p in result["predictions"]] == sums.argmin(1).tolist()
    assert [p["pred_norm"] for p in result["predictions"]] == means.argmin(1).tolist()
    assert result["correct"] == (sums.argmin(1) == labels).sum().item()
    assert result["correct_norm"] == (means.argmin(1) == labels).sum().item()
    assert result["acc"] == result["correct"] / len(examples)


# -----------------------------------------------------------------------------------------------
# Command line: in process, then two ranks under torchrun


def check_record(path, reference):
    examples, sums, means = reference
    with open(path) as f:
        record = json.load(f)
    assert record["n"] == len(examples) and record["cropped"] == 22
    assert [p["pred"] for p in record["predictions"]] == sums.argmin(1).tolist()
    assert [p["pred_norm"] for p in record["predictions"]] == means.argmin(1).tolist()
    assert [p["label"] for p in record["predictions"]] == [ex["label"] for ex in examples]
    return record


def test_cli(reference, hf_dir, sample, tmp_path, capsys):
    out = tmp_path / "out.json"
    hellaswag.main(["-m", hf_dir, "--data", sample, "--device", "cpu", "--dtype", "fp32", "--batch-size", "8",
                    "--out", str(out)])
    record = check_record(out, reference)
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"hellaswag val: n=39 acc={record['acc']:.4f} acc_norm={record['acc_norm']:.4f} "
        f"(22 examples longer than block_size {BLOCK_SIZE}: contexts cropped from the left)")


def test_two_ranks_and_a_checkpoint(reference, hf_dir, sample, tmp_path):
    model = tg.GPT.from_pretrained(hf_dir)
    ckpt = str(tmp_path / "model.pt")
    # train_gpt2.py's checkpoint format around this model, at step 0 (nothing to resume)
    torch.save({"format": tg.CHECKPOINT_FORMAT, "version": tg.CHECKPOINT_VERSION, "step": 0,
                "model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                "optimizer": {"state": {}, "param_groups": []}, "train_loader": {"position": 0},
                "rng": [tg.rng_state("cpu")], "world_size": 1, "run_config": {}}, ckpt)
    out = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "hellaswag.py"), "--checkpoint", ckpt, "--data", sample, "--device", "cpu",
           "--dtype", "fp32", "--batch-size", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_record(out, reference)
    assert proc.stdout.count("hellaswag val:") == 1  # rank 0 alone reports


# -----------------------------------------------------------------------------------------------
# Data: download, bad files, errors


def test_download_to_cache_and_offline_error(hellaswag_val, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("HELLASWAG_CACHE", str(cache))
    (tmp_path / "hellaswag_val.jsonl").write_bytes(open(hellaswag_val, "rb").read())  # the "server"'s file
    url = "file://" + str(tmp_path / "hellaswag_{split}.jsonl")
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", url)
    examples = hellaswag.load_examples(None, split="val", limit=5)
    assert len(examples) == 5 and examples[0]["ind"] == 0
    assert sorted(os.listdir(cache)) == ["hellaswag_val.jsonl"]  # renamed into place, no temporary left
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", "http://127.0.0.1:9/hellaswag_{split}.jsonl")
    assert len(hellaswag.load_examples(None, split="val", limit=5)) == 5  # cached: no download
    with pytest.raises(UserError, match=r"cannot download http://127.0.0.1:9/hellaswag_train.jsonl"):
        hellaswag.load_examples(None, split="train")
    assert sorted(os.listdir(cache)) == ["hellaswag_val.jsonl"]


GOOD = {"ctx": "A man is sitting on a roof. he", "label": 0, "endings": ["a", "b", "c", "d"]}


@pytest.mark.parametrize("bad_line, message", [
    ('{"ctx": "x", "label": 0, "endings": ["a", "b"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({**GOOD, "label": 4}), "'label' must be an integer 0..3, got 4"),
    (json.dumps({**GOOD, "label": True}), "'label' must be an integer 0..3, got True"),
    (json.dumps({**GOOD, "endings": ["a", "b", "c"]}), "'endings' must be a list of 4 strings"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "ctx"}), "'ctx' must be a non-empty string"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "label"}), "no 'label'"),
])
def test_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), json.dumps(GOOD), bad_line, json.dumps(GOOD)]) + "\n")
    with pytest.raises(UserError) as e:
        hellaswag.load_examples(str(path))
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)
    assert len(hellaswag.load_examples(str(path), limit=2)) == 2  # the lines before it are fine


def test_cli_errors_are_one_line(tmp_path, hf_dir, sample, capsys):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text(json.dumps({**GOOD, "label": 7}) + "\n")
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a checkpoint at all")
    data = ["--data", sample, "--limit", "2", "--device", "cpu"]
    cases = [
        (["-m", hf_dir, "--data", str(bad_data)], f"{bad_data}:1: 'label' must be an integer 0..3, got 7"),
        (["-m", hf_dir, "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
        (["--checkpoint", str(bad_ckpt), *data], "not a readable checkpoint"),
        (["--checkpoint", str(tmp_path / "missing.pt"), *data], "no such checkpoint file"),
        (["-m", str(tmp_path / "no-model-here"), *data], "cannot load model"),
        (["-m", hf_dir, *data, "--limit", "-1"], "argument --limit: must be an integer of at least 0, got -1"),
        (["-m", hf_dir, *data, "--batch-size", "0"], "argument --batch-size: must be an integer of at least 1, got 0"),
        (["-m", hf_dir, *data, "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["-m", hf_dir, *data, "--device", "tpu"], "--device tpu: use auto, cpu, cuda, cuda:N or mps"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            hellaswag.main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code != 0 and len(lines) == 1, (args, lines)
        assert lines[0].startswith("hellaswag.py: error: ") and message in lines[0], lines


def test_exit_status_and_import_does_nothing(tmp_path):
    """In a fresh process: importing hellaswag loads no transformers; bad input exits 1 with one line."""
    code = "import sys, hellaswag; assert 'transformers' not in sys.modules; hellaswag.main()"
    proc = subprocess.run([sys.executable, "-c", code, "--data", str(tmp_path / "missing.jsonl")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == f"hellaswag.py: error: {tmp_path}/missing.jsonl: no such file\n"
