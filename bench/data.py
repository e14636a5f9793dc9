"""The two public data files that the benchmarks read.

    from bench.data import data_file
    data_file("tinyshakespeare.txt"), data_file("hellaswag_val.jsonl")

Tiny Shakespeare is input.txt in the repository. HellaSwag's validation set is ../shared/data's copy
where there is one (the project's own machines), else hellaswag.py's download (hellaswag/ beside the
scripts, or $HELLASWAG_CACHE; fetched once). The tests need neither: they use tests/data.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "hellaswag_val.jsonl")


def data_file(name: str) -> str:
    if name == "tinyshakespeare.txt":
        return os.path.join(ROOT, "input.txt")
    if name != "hellaswag_val.jsonl":
        raise ValueError(f"unknown data file {name!r}: tinyshakespeare.txt or hellaswag_val.jsonl")
    if os.path.isfile(SHARED):
        return SHARED
    import hellaswag  # imported here: bench.fineweb's parent process stays without torch

    return hellaswag.download("val")
