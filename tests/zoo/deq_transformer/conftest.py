"""Fixtures of the DEQ Transformer tests: a WikiText folder in the release layout and a
MediaWiki XML dump like the one gensim ships."""
import bz2

import pytest

WIKITEXT_TRAIN = """ 
 = Valkyria Chronicles III = 
 
 Senjō no Valkyria 3 : <unk> Chronicles is a tactical role @-@ playing video game . 
 The game began development in 2010 , carrying over a large portion of the work . 
 
 = = Gameplay = = 
 
 The game is a tactical role @-@ playing game with 1 @,@ 000 units . 
"""
WIKITEXT_VALID = """ 
 = = Plot = = 
 
 The game is a game . 
"""
WIKITEXT_TEST = """ 
 The work began in 2010 . 
"""


def write_wikitext(root, names=("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in zip(names, (WIKITEXT_TRAIN, WIKITEXT_VALID, WIKITEXT_TEST)):
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def wikitext(tmp_path):
    return write_wikitext(tmp_path / "wikitext-103")


PAGE = """<page><title>{title}</title><ns>{ns}</ns><id>{id}</id><revision><id>{id}0</id>
<text xml:space="preserve">{text}</text></revision></page>"""


def write_dump(path, pages):
    """A bz2 MediaWiki export (the layout gensim's extract_pages reads): (title, ns, text) pages."""
    body = "".join(PAGE.format(title=t, ns=ns, id=i + 1, text=x) for i, (t, ns, x) in enumerate(pages))
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
           f"<siteinfo><sitename>Wikipedia</sitename></siteinfo>{body}</mediawiki>")
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write(xml)
    return path


@pytest.fixture
def dump_writer():
    return write_dump

