"""wiki_mini: the Wikipedia articles shipped in gensim's test data as a WikiText-style folder.

gensim's wheel carries ``test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-
shortened.bz2`` (a real Wikipedia dump excerpt, CC BY-SA): 206 pages in namespace 0, of
which 99 are redirects and one has no text. `build_wiki_mini(out)` turns the other 106
articles into ``out/wiki.{train,valid,test}.tokens`` in WikiText-103's layout, which
`zoo.deq_transformer.data` reads like the real corpus. The conversion is fixed:

* Markup: gensim's ``filter_wiki`` (links, templates, refs, tables removed), then the
  bold/italic quotes ``'''``/``''`` and list bullets (``* # : ;`` at a line start) dropped.
* Layout (WikiText's): an article starts with `` = Title = ``; a ``==Section==`` heading of
  level k becomes `` = = Section = = `` with k ``=`` on each side (a ``==`` heading: two); headings are surrounded by
  blank lines; one paragraph per line; every line starts with a space and ends with `` \\n``.
* Tokens (WikiText's style): words, numbers and single punctuation marks are separate
  tokens; a hyphen, comma or point between two word characters becomes ``@-@``, ``@,@``,
  ``@.@`` (``1,000`` -> ``1 @,@ 000``, ``self-governed`` -> ``self @-@ governed``); clitics are
  split off (``don't`` -> ``don 't``). Case is kept.
* Split by article: the articles in a seeded shuffle (numpy ``default_rng(0)``), the first
  90 % (by count, rounded) to train, the next 5 % to valid, the rest to test.
* ``<unk>``: a token seen fewer than ``min_count=3`` times in the train split is ``<unk>``
  in every split, so the vocabulary is the train split's and has no unseen test words.

`python scripts/make_wiki_mini.py --out data/wiki_mini` is the command line; the loader
builds the folder itself on first use when ``data.name=wiki_mini`` (from the installed
gensim package; nothing is downloaded).
"""
from __future__ import annotations

import bz2
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Sequence

import numpy as np

DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPLITS = ("train", "valid", "test")
UNK = "<unk>"

_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
_TOKEN = re.compile(r"\w+(?:[-,.]\w+)*|n't|'\w+|[^\w\s]")
_SEPARATOR = re.compile(r"(?<=\w)([-,.])(?=\w)")
_BULLETS = re.compile(r"^[*#:;\s]+")


def tokenize(text: str) -> List[str]:
    """WikiText-style tokens of one line of plain text (see the module docstring)."""
    tokens: List[str] = []
    for match in _TOKEN.finditer(text.replace("'''", "").replace("''", '"')):
        piece = match.group(0)
        if len(piece) > 2 and _SEPARATOR.search(piece):
            tokens.extend(_SEPARATOR.sub(r" @\1@ ", piece).split())
        else:
            tokens.append(piece)
    return tokens


def article_lines(title: str, text: str) -> List[List[str]]:
    """The token lines of one article in WikiText's layout ([] is a blank line)."""
    lines: List[List[str]] = [[], ["="] + tokenize(title) + ["="], []]
    for raw in text.splitlines():
        raw = raw.strip()
        if not raw:
            continue
        heading = _HEADING.match(raw)
        if heading:
            words = tokenize(heading.group(2))
            if words:
                marks = ["="] * len(heading.group(1))
                lines += [[], marks + words + marks, []]
            continue
        words = tokenize(_BULLETS.sub("", raw))
        if words:
            lines.append(words)
    return lines


def read_articles(dump: str | Path | None = None) -> List[tuple[str, List[List[str]]]]:
    """(title, token lines) of every non-redirect article of the gensim dump, in dump order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    if dump is None:  # gensim.test.utils.datapath, without that module's import-time corpus building
        import gensim

        dump = Path(gensim.__file__).parent / "test" / "test_data" / DUMP_NAME
    articles = []
    with bz2.open(dump, "rb") as f:
        for title, text, _page_id in extract_pages(f, filter_namespaces=("0",)):
            plain = filter_wiki(text)
            if plain.lstrip().lower().startswith("#redirect"):
                continue
            lines = article_lines(title, plain)
            if any(lines[3:]):  # more than its title (gensim yields other namespaces' pages empty)
                articles.append((title, lines))
    return articles


def split_articles(n: int, fractions: Sequence[float] = (0.9, 0.05, 0.05), seed: int = 0) -> List[np.ndarray]:
    """Article indices of train / valid / test: a seeded shuffle cut by `fractions` of the count."""
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    return [np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_valid]),
            np.sort(order[n_train + n_valid:])]


def apply_unk(splits: Sequence[List[List[str]]], min_count: int) -> Counter:
    """Replaces (in place) tokens seen fewer than `min_count` times in train by <unk>."""
    counts = Counter(tok for line in splits[0] for tok in line)
    keep = {tok for tok, c in counts.items() if c >= min_count}
    for lines in splits:
        for line in lines:
            line[:] = [tok if tok in keep else UNK for tok in line]
    return counts


def write_tokens(path: Path, lines: Iterable[List[str]]) -> None:
    """WikiText layout: ' tok tok \\n' per line, ' \\n' for a blank one."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(" " + " ".join(line) + " \n" if line else " \n")


def build_wiki_mini(out: str | Path, min_count: int = 3, seed: int = 0, dump: str | Path | None = None) -> dict:
    """Writes ``out/wiki.{train,valid,test}.tokens`` and ``out/wiki_mini.json`` (the recipe and counts)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    articles = read_articles(dump)
    parts = split_articles(len(articles), seed=seed)
    splits = [[line for i in idx for line in articles[i][1]] for idx in parts]
    apply_unk(splits, min_count)
    info = {"source": f"gensim test data {DUMP_NAME}", "articles": len(articles),
            "min_count": min_count, "split_seed": seed, "fractions": [0.9, 0.05, 0.05]}
    for name, idx, lines in zip(SPLITS, parts, splits):
        tmp = out / f"wiki.{name}.tokens.tmp"
        write_tokens(tmp, lines)
        tmp.replace(out / f"wiki.{name}.tokens")
        info[name] = {"articles": [articles[i][0] for i in idx],
                      "tokens": sum(len(line) for line in lines),
                      "lines": len(lines),
                      "unk": sum(tok == UNK for line in lines for tok in line)}
    info["vocab_size"] = len({tok for line in splits[0] for tok in line}) + 1  # + <eos>
    (out / "wiki_mini.json").write_text(json.dumps(info, indent=1))
    return info
