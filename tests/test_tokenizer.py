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
