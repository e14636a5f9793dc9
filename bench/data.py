"""The two public data files that the tests and the benchmarks read, found or fetched in one place.

    from bench.data import data_file
    data_file("tinyshakespeare.txt"), data_file("hellaswag_val.jsonl")   # paths of checked copies

Each file is looked for, in order:
  1. in ../shared/data beside the repository (the offline CI machines keep it there);
  2. where a user's own first run leaves it: Tiny Shakespeare as input.txt in the repository root
     (the quick start downloads it there), HellaSwag's validation set in hellaswag.py's download
     folder (hellaswag/ beside it, or $HELLASWAG_CACHE);
  3. otherwise it is downloaded to that second place, once, from the URL the scripts use
     (train_gpt2.TINY_SHAKESPEARE_URL, hellaswag.HELLASWAG_URL) by their own fineweb.download.
A file is used only once it is checked, so a cut download or another text under the same name is
refused: Tiny Shakespeare by its sha256, HellaSwag by its 10,042 complete examples (the hash of
rowanz's file is not pinned: ../shared/data holds another extraction of the same examples).
Offline, with neither copy, DataError says which file is missing and the two ways to provide it.
"""
import functools
import hashlib
import os
import sys

from fineweb import UserError, download

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
HELLASWAG_VAL_EXAMPLES = 10_042
NAMES = ("tinyshakespeare.txt", "hellaswag_val.jsonl")


class DataError(Exception):
    """A data file that is missing and cannot be fetched, or fails its check; one line."""


def source(name: str) -> tuple[str, str]:
    """(where a user's first run keeps `name` and a download puts it, the URL it comes from)."""
    # imported here: bench.fineweb's parent process stays without torch
    if name == "tinyshakespeare.txt":
        import train_gpt2

        return os.path.join(ROOT, "input.txt"), train_gpt2.TINY_SHAKESPEARE_URL
    import hellaswag

    return os.path.join(hellaswag.cache_dir(), name), hellaswag.HELLASWAG_URL.format(split="val")


def check(name: str, path: str):
    """Raise DataError unless `path` holds the whole of `name`."""
    if name == "tinyshakespeare.txt":
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != SHAKESPEARE_SHA256:
            raise DataError(f"{path}: not Tiny Shakespeare (sha256 {digest[:12]}..., expected "
                            f"{SHAKESPEARE_SHA256[:12]}...): cut short, or another text")
        return
    import hellaswag

    try:
        count = len(hellaswag.load_examples(path))
    except UserError as e:  # a line cut in the middle is not JSON
        raise DataError(str(e)) from None
    if count != HELLASWAG_VAL_EXAMPLES:
        raise DataError(f"{path}: {count:,} HellaSwag examples, the validation set has "
                        f"{HELLASWAG_VAL_EXAMPLES:,}: cut short, or another split")


@functools.cache
def data_file(name: str) -> str:
    """The path of a checked copy of `name` (one of NAMES): see the module's docstring."""
    if name not in NAMES:
        raise ValueError(f"unknown data file {name!r}: one of {', '.join(NAMES)}")
    shared = os.path.join(SHARED_DATA, name)
    if os.path.isfile(shared):
        check(name, shared)
        return shared
    path, url = source(name)
    if os.path.isfile(path):
        try:
            check(name, path)
        except DataError as e:
            raise DataError(f"{e}; delete it and it is downloaded again") from None
        return path
    try:
        download(url, path)  # an atomic write: an interrupted download leaves no file
    except OSError as e:  # no network, a refused connection, an HTTP error...
        reason = " ".join(str(getattr(e, "reason", None) or e).split())[:200]
        raise DataError(f"{name}: not in {SHARED_DATA} nor at {path}, and downloading {url} "
                        f"failed ({reason}): connect to the internet once (the file is then kept "
                        f"at {path}), or copy the file there") from None
    try:
        check(name, path)
    except DataError as e:
        os.remove(path)  # never left for a later run to trust
        raise DataError(f"downloaded, then removed: {e}") from None
    print(f"downloaded {url} -> {path}", file=sys.stderr)
    return path
