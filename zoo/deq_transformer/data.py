"""WikiText corpora for the DEQ Transformer: files -> vocabulary -> id streams -> BPTT segments.

`build_datasets(cfg.data)` reads ``data.root`` for ``data.name``:

* ``wikitext103`` / ``wikitext2``: ``wiki.{train,valid,test}.tokens`` as in
  wikitext-103-v1.zip (or the names locuslab/deq renames them to, ``{train,valid,test}.txt``).
* ``wiki_mini`` (offline): the same layout, built from gensim's Wikipedia test data by
  `zoo.deq_transformer.wiki_mini` on first use (``scripts/make_wiki_mini.py``).

Every line is whitespace-split and gets an ``<eos>`` (blank lines too, as the reference
loader does); case is kept; the vocabulary is the train split's tokens in frequency order
(ties in first-seen order), so WikiText-103 gives 267,735 types. The encoded splits are
cached beside the text as ``cache.pt`` holding only plain tensors and a list of strings
(read back with ``weights_only=True``), keyed by the sizes and times of the text files.

`LMStream` is the ordered BPTT iterator: a split's id stream cut into ``batch_size``
contiguous columns (this rank's share of the global batch under torchrun), read in
segments of ``tgt_len`` tokens, each target shifted by one; segment k of column b continues
segment k-1 of column b, which is what the memory of past fixed points relies on.
``segments(start)`` resumes mid-epoch at segment ``start``.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch

from zoo.common import MissingDataError, require_files

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
CACHE_NAME = "cache.pt"
CACHE_VERSION = 1
NAMES = ("wikitext103", "wikitext2", "wiki_mini")

LAYOUT = ("WikiText in its release layout: <root>/wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens "
          "(unzip wikitext-103-v1.zip or wikitext-2-v1.zip and point data.root at the folder inside; "
          "the names train.txt / valid.txt / test.txt of locuslab/deq's get_data.sh work too). "
          "Offline: +experiment=wiki_mini builds a corpus from gensim's test data.")


def split_files(root: str | Path) -> Dict[str, Path]:
    """The three text files under `root` (release names first, then the renamed ones)."""
    root = Path(root)
    for pattern in ("wiki.{}.tokens", "{}.txt"):
        files = {s: root / pattern.format(s) for s in SPLITS}
        if all(p.is_file() for p in files.values()):
            return files
    require_files(root, [f"wiki.{s}.tokens" for s in SPLITS], layout=LAYOUT)
    raise AssertionError("unreachable")


def read_tokens(path: Path) -> Iterator[List[str]]:
    """The tokens of each line of a WikiText file, with <eos> appended."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.split() + [EOS]


@dataclass
class Corpus:
    """A tokenised corpus: the vocabulary and one id tensor per split."""

    vocab: List[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor

    @property
    def n_token(self) -> int:
        return len(self.vocab)

    def index(self) -> Dict[str, int]:
        return {tok: i for i, tok in enumerate(self.vocab)}

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"split {name!r}: use one of {SPLITS}")
        return getattr(self, name)


def build_vocab(path: Path) -> List[str]:
    """Train-split types in frequency order (ties: first seen first), <eos> included."""
    counts: Counter = Counter()
    for tokens in read_tokens(path):
        counts.update(tokens)
    return [tok for tok, _ in counts.most_common()]


def encode_file(path: Path, index: Dict[str, int]) -> torch.Tensor:
    """The ids of every token of `path`; a token outside the vocabulary is an error unless <unk> exists."""
    unk = index.get("<unk>")
    ids: List[int] = []
    for tokens in read_tokens(path):
        for tok in tokens:
            i = index.get(tok, unk)
            if i is None:
                raise ValueError(f"{path}: token {tok!r} is not in the train vocabulary and there is no <unk>")
            ids.append(i)
    return torch.tensor(ids, dtype=torch.int64)


def _fingerprint(files: Dict[str, Path]) -> List[int]:
    out = []
    for s in SPLITS:
        st = os.stat(files[s])
        out += [int(st.st_size), int(st.st_mtime_ns)]
    return out


def load_corpus(root: str | Path, use_cache: bool = True) -> Corpus:
    """Reads (or loads the cache of) the corpus under `root`."""
    files = split_files(root)
    cache = Path(root) / CACHE_NAME
    stamp = torch.tensor(_fingerprint(files) + [CACHE_VERSION], dtype=torch.int64)
    if use_cache and cache.is_file():
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if torch.equal(saved["stamp"], stamp):
                return Corpus(list(saved["vocab"]), saved["train"], saved["valid"], saved["test"])
        except Exception:  # a stale or truncated cache is rebuilt
            pass
    vocab = build_vocab(files["train"])
    index = {tok: i for i, tok in enumerate(vocab)}
    corpus = Corpus(vocab, *(encode_file(files[s], index) for s in SPLITS))
    if use_cache:
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        try:
            torch.save({"stamp": stamp, "vocab": vocab, "train": corpus.train, "valid": corpus.valid,
                        "test": corpus.test}, tmp)
            tmp.replace(cache)
        except OSError:  # a read-only dataset folder: no cache
            tmp.unlink(missing_ok=True)
    return corpus


def default_wiki_mini_root() -> Path:
    return Path(os.environ.get("ZOO_DATA", "data")) / "wiki_mini"


def build_datasets(data_cfg: Any) -> Corpus:
    """The corpus `data_cfg` names; a missing dataset is a MissingDataError naming the layout."""
    name = str(data_cfg.name)
    if name not in NAMES:
        raise ValueError(f"data.name={name!r}: use one of {', '.join(NAMES)}")
    root = data_cfg.get("root")
    if name == "wiki_mini":
        root = Path(root) if root not in (None, "") else default_wiki_mini_root()
        if not all((root / f"wiki.{s}.tokens").is_file() for s in SPLITS):
            try:
                from zoo.deq_transformer.wiki_mini import build_wiki_mini
                build_wiki_mini(root, min_count=int(data_cfg.get("min_count", 3)))
            except ImportError as err:
                raise MissingDataError(f"wiki_mini needs gensim (pip install -e '.[text]'): {err}") from None
    elif root in (None, ""):
        require_files(root, [f"wiki.{s}.tokens" for s in SPLITS], layout=LAYOUT)
    return load_corpus(root, use_cache=bool(data_cfg.get("cache", True)))


class LMStream:
    """Ordered BPTT segments of one id stream (see the module docstring).

    The stream is trimmed to a multiple of ``batch_size * world_size`` and viewed as that
    many columns; this rank reads columns ``rank*batch_size .. (rank+1)*batch_size``.
    Segment k is ``(x, y)`` with x = columns[:, k*T:(k+1)*T] and y the next tokens; the
    last segment may be shorter.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, tgt_len: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or tgt_len < 1:
            raise ValueError(f"batch_size={batch_size}, tgt_len={tgt_len}: both must be >= 1")
        columns = batch_size * world_size
        length = ids.numel() // columns
        if length < 2:
            raise ValueError(f"a stream of {ids.numel()} tokens is too short for {columns} columns")
        data = ids[: columns * length].view(columns, length)
        self.data = data[rank * batch_size:(rank + 1) * batch_size]
        self.tgt_len = tgt_len

    def __len__(self) -> int:
        return -(-(self.data.shape[1] - 1) // self.tgt_len)

    @property
    def n_targets(self) -> int:
        return self.data.shape[0] * (self.data.shape[1] - 1)

    def segment(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        begin = k * self.tgt_len
        end = min(begin + self.tgt_len, self.data.shape[1] - 1)
        return self.data[:, begin:end], self.data[:, begin + 1:end + 1]

    def segments(self, start: int = 0) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
        """(k, x, y) for k = start, start+1, ..."""
        for k in range(start, len(self)):
            x, y = self.segment(k)
            yield k, x, y
