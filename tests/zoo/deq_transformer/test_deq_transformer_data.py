"""The WikiText loader, its cache, the ordered BPTT stream, the wiki_mini converter and the
count baselines."""
import math

import numpy as np
import pytest
import torch

from zoo.common import MissingDataError
from zoo.deq_transformer.baselines import KneserNeyBigram, unigram_ppl
from zoo.deq_transformer.data import CACHE_NAME, EOS, LMStream, load_corpus
from zoo.deq_transformer.wiki_mini import apply_unk, build_wiki_mini, split_articles, tokenize

from .conftest import WIKITEXT_TRAIN, write_wikitext


def test_loader_reads_wikitext_vocab_in_frequency_order_with_eos(wikitext):
    corpus = load_corpus(wikitext)
    lines = WIKITEXT_TRAIN.splitlines(keepends=True)
    assert corpus.train.numel() == sum(len(line.split()) + 1 for line in lines)
    assert corpus.vocab[:2] == [EOS, "="]                      # 9 <eos>, then 6 "="
    counts = {tok: 0 for tok in corpus.vocab}
    for line in lines:
        for tok in line.split() + [EOS]:
            counts[tok] += 1
    assert [counts[t] for t in corpus.vocab] == sorted(counts.values(), reverse=True)
    assert corpus.decode(corpus.train[:6]) == "<eos> = Valkyria Chronicles III ="
    # a valid word that train lacks ("Plot") reads as <unk>, a type of the train vocabulary here
    assert corpus.decode(corpus.valid).split() == "<eos> = = <unk> = = <eos> <eos> The game is a game . <eos>".split()


def test_cache_reloads_identical_plain_tensors_and_is_rebuilt_when_text_changes(wikitext):
    first = load_corpus(wikitext)
    cache = wikitext / CACHE_NAME
    saved = torch.load(cache, weights_only=True)              # no pickled objects inside
    assert set(saved) == {"stamp", "vocab", "train", "valid", "test"}
    again = load_corpus(wikitext)
    assert again.vocab == first.vocab and all(torch.equal(getattr(again, s), getattr(first, s))
                                              for s in ("train", "valid", "test"))
    (wikitext / "wiki.valid.tokens").write_text(" The work . \n", encoding="utf-8")
    changed = load_corpus(wikitext)
    assert changed.decode(changed.valid) == "The work . <eos>"


def test_renamed_files_load_and_missing_files_name_the_layout(tmp_path):
    renamed = write_wikitext(tmp_path / "renamed", ("train.txt", "valid.txt", "test.txt"))
    assert load_corpus(renamed).n_token == load_corpus(write_wikitext(tmp_path / "release")).n_token
    with pytest.raises(MissingDataError, match=r"wiki\.train\.tokens(.|\n)*wikitext-103-v1\.zip"):
        load_corpus(tmp_path)


def test_unknown_token_without_unk_is_an_error(wikitext):
    (wikitext / "wiki.train.tokens").write_text(WIKITEXT_TRAIN.replace("<unk>", "Senjo"), encoding="utf-8")
    (wikitext / "wiki.test.tokens").write_text(" zebra \n", encoding="utf-8")
    with pytest.raises(ValueError, match="wiki.valid.tokens: token .Plot. is not in the train vocabulary"):
        load_corpus(wikitext, use_cache=False)


@pytest.mark.parametrize("world", [1, 2])
def test_stream_segments_are_contiguous_across_batches_and_ranks(world):
    ids = torch.arange(103)
    tgt = 4
    columns = []
    for rank in range(world):
        stream = LMStream(ids, 3, tgt, rank, world)
        xs, ys = zip(*[(x, y) for _, x, y in stream.segments()])
        x, y = torch.cat(xs, 1), torch.cat(ys, 1)
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
        assert all(s.shape[1] == tgt for s in xs[:-1])
        columns.append(x)
        resumed = [k for k, _, _ in stream.segments(2)]
        assert resumed == list(range(2, len(stream)))
    # the columns of all ranks tile the trimmed stream in order, each continuing the previous
    cols = torch.cat(columns, 0)
    length = 103 // (3 * world)
    assert torch.equal(cols, ids[: 3 * world * length].view(3 * world, length)[:, :-1])


def test_tokenize_is_wikitext_style():
    assert tokenize("It's the '''best''' self-governed city (1,000 people; 8.5 km), don't.") == [
        "It", "'s", "the", "best", "self", "@-@", "governed", "city", "(", "1", "@,@", "000", "people",
        ";", "8", "@.@", "5", "km", ")", ",", "don", "'t", "."]


def test_wiki_mini_from_a_mediawiki_dump(tmp_path, dump_writer):
    pytest.importorskip("gensim", reason="the `text` extra (gensim) reads MediaWiki dumps")
    text = "'''{}''' is a city. The city has a river.\n\n==History==\nThe river is old.\n"
    pages = [(f"Town{i}", 0, text.format(f"Town{i}")) for i in range(20)]
    pages += [("Redirect", 0, "#REDIRECT [[Town1]]"), ("Talk:Town1", 1, "a talk page")]
    dump = dump_writer(tmp_path / "dump.xml.bz2", pages)
    info = build_wiki_mini(tmp_path / "out", min_count=3, dump=dump)
    assert info["articles"] == 20
    assert [len(info[s]["articles"]) for s in ("train", "valid", "test")] == [18, 1, 1]
    valid = (tmp_path / "out" / "wiki.valid.tokens").read_text().splitlines()
    assert info["valid"]["articles"][0].startswith("Town")
    # the title is seen once in train, below min_count, so it is <unk> like every other title
    assert valid[:4] == [" ", " = <unk> = ", " ", " <unk> is a city . The city has a river . "]
    assert valid[4:8] == [" ", " = = History = = ", " ", " The river is old . "]
    assert all(line.startswith(" ") and line.endswith(" ") for line in valid)
    corpus = load_corpus(tmp_path / "out")
    assert "<unk>" in corpus.vocab and not any(t.startswith("Town") for t in corpus.vocab)


def test_split_is_90_5_5_by_count_and_unk_uses_train_counts():
    parts = split_articles(107)
    assert [len(p) for p in parts] == [96, 5, 6]
    assert sorted(np.concatenate(parts).tolist()) == list(range(107))
    splits = [[["a", "a", "a", "b"]], [["b", "a", "c"]]]
    apply_unk(splits, 3)
    assert splits == [[["a", "a", "a", "<unk>"]], [["<unk>", "a", "<unk>"]]]


def test_kneser_ney_bigram_is_a_distribution_and_matches_a_hand_count():
    train = torch.tensor([0, 1, 2, 1, 2, 1, 3, 0, 1, 2])      # eos = 0
    kn = KneserNeyBigram(train, 5, eos=0)
    for v in range(5):
        assert kn.prob(np.full(5, v), np.arange(5)).sum() == pytest.approx(1.0)
    # By hand: pairs (with the leading eos) 0-0, 0-1 x2, 1-2 x3, 2-1 x2, 1-3, 3-0: n1 = 3, n2 = 2
    d = 3 / (3 + 2 * 2)
    cont = np.array([2, 2, 1, 1, 0], float)                   # N1+(. w)
    d1 = 2 / (2 + 2 * 2)
    p_cont = np.maximum(cont - d1, 0) / cont.sum() + d1 * 4 / cont.sum() / 5
    expected = (3 - d) / 4 + d * 2 / 4 * p_cont[2]              # P(2 | 1): c(1) = 4, two followers
    assert kn.prob(np.array([1]), np.array([2]))[0] == pytest.approx(expected)
    ppl = kn.ppl(torch.tensor([1, 2, 1, 2]))
    assert ppl < unigram_ppl(train, torch.tensor([1, 2, 1, 2]), 5)
    assert math.isfinite(kn.ppl(torch.tensor([4, 4])))         # an unseen context backs off
