"""Build the offline word-level LM corpus of zoo/deq_transformer from gensim's test data.

    python scripts/make_wiki_mini.py --out data/wiki_mini [--min-count 3] [--seed 0]

writes ``wiki.{train,valid,test}.tokens`` (WikiText-103's layout) and ``wiki_mini.json``;
the tokenisation, the <unk> threshold and the 90/5/5 article split are documented in
zoo/deq_transformer/wiki_mini.py. Needs gensim (the `text` extra); downloads nothing.
"""
import argparse
import json

from zoo.deq_transformer.wiki_mini import build_wiki_mini


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/wiki_mini", help="output folder")
    parser.add_argument("--min-count", type=int, default=3, help="train count below which a token is <unk>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the article shuffle")
    args = parser.parse_args()
    info = build_wiki_mini(args.out, min_count=args.min_count, seed=args.seed)
    print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "articles"})
                      for k, v in info.items()}, indent=1))


if __name__ == "__main__":
    main()
