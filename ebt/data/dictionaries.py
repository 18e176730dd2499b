"""Optional English sources from Debian's dictionary packages (not part of the default corpus).

GCIDE, the Jargon File, FOLDOC and The Devil's Dictionary ship as dictd databases: a `.index` of
`headword<TAB>offset<TAB>length` lines (numbers in dictd's base 64) beside a `.dict.dz` (dictzip,
which plain gzip reads) holding the articles. WordNet ships its own `data.<pos>` files. Each parser
returns one document per article (or synset), markup stripped, in file order, so the corpus stays a
function of the seed alone.
"""

import gzip
import html
import re
import string
import unicodedata
import zlib
from pathlib import Path

from ebt.data.fetch import SourceUnavailable, apt_download, deb_extract, have_apt
from ebt.data.document import Document

B64 = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
_B64 = {c: i for i, c in enumerate(B64)}


def b64_number(text):
    """dictd's base-64 numbers: most significant digit first, no padding ("B" = 1, "BA" = 64)."""
    value = 0
    for c in text:
        value = value * 64 + _B64[c]
    return value


def _decode_article(data):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few GCIDE articles hold stray Windows-1252 bytes
        return data.decode("cp1252", errors="replace")


def read_dictd(index_path, dict_path):
    """[(headwords, article)] in file order; headwords that share one article are grouped."""
    try:
        raw = gzip.open(dict_path).read()
    except (OSError, EOFError, zlib.error) as e:
        raise SourceUnavailable(f"{dict_path} is not a readable dictzip file ({e}); "
                                f"delete its .deb so it is downloaded again") from e
    spans = {}  # (offset, length) -> headwords, in index order
    for n, line in enumerate(Path(index_path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        fields = line.split("\t")
        try:
            span = (b64_number(fields[1]), b64_number(fields[2]))
        except (IndexError, KeyError):
            raise SourceUnavailable(f"{index_path}:{n} is not a dictd index line; "
                                    f"delete its .deb so it is downloaded again") from None
        spans.setdefault(span, []).append(fields[0])
    return [(heads, _decode_article(raw[o:o + k])) for (o, k), heads in sorted(spans.items())]


def _is_meta(heads):
    # dictfmt's own entries ("00-database-info", "00databaseshort", ...) describe the file, not English
    return any(h.startswith("00-") or (h.startswith("00") and "database" in h) for h in heads)


def _unbrace(text):
    """{cross references} -> their words; a reference wrapped across lines ("{\n  management}") is
    joined first so no stray line break or space is left inside it."""
    text = re.sub(r"\{\s+", "{", re.sub(r"\s+\}", "}", text))
    return text.replace("{", "").replace("}", "")


def _tidy(text):
    """Strip every line (the layout's indentation is not text) and collapse runs of blank lines."""
    text = "\n".join(line.strip() for line in text.replace("\r\n", "\n").split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---------------------------------------------------------------- GCIDE

GCIDE_LETTERS = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "=ae": "ǣ", "imac": "ī", "aum": "ä",
                 "eth": "ð", "thorn": "þ", "yogh": "ȝ", "deg": "°", "sect": "§", "root": "√", "ng": "ŋ"}
GCIDE_MARKS = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "^": "\u0302", "~": "\u0303", "=": "\u0304",
               ".": "\u0307", ",": "\u0327", "-": "", "*": ""}
# which edition or editor an entry or sense comes from: [1913 Webster], [WordNet 1.5 +PJC], [RDH]
GCIDE_SOURCE_TAG = re.compile(
    r"[ \t]*\[(?:[^\]\n]*(?:Webster|WordNet|Century Dict)[^\]\n]*|[^\]\n]*PJC|RDH)\]")
GCIDE_PRONUNCIATION = re.compile(r"[ \t]*\((?=[^()\n]*\[[^\]\n]{1,5}\])[^()\n]*\)")


def _gcide_letter(m):
    code = m.group(1)
    if code in GCIDE_LETTERS:
        return GCIDE_LETTERS[code]
    if len(code) == 2 and code[0] in GCIDE_MARKS and code[1].isalpha():
        return code[1] + GCIDE_MARKS[code[0]]
    if len(code) == 2 and code[1] == "^" and code[0].isalpha():
        return code[0] + "\u0306"  # a breve
    return m.group(0)  # a real bracket: [R.], [Obs.], [2]


def clean_gcide(article):
    """Drop source tags ([1913 Webster]) and pronunciations (\\A*ban"don\\, ([.a]*b[a^]n"d[u^]n)),
    write accent codes (['e], [ae]) as letters, and unwrap {cross references}."""
    text = GCIDE_SOURCE_TAG.sub("", article)
    text = re.sub(r"[ \t]?\\[^\\\n]*\\", "", text)
    text = GCIDE_PRONUNCIATION.sub("", text)
    text = re.sub(r"\[([^\[\]\s]{2,5})\]", _gcide_letter, text)
    text = _tidy(unicodedata.normalize("NFC", _unbrace(text)))
    return text.replace("\n,", ",")  # a comma that followed a removed pronunciation on the next line


# ---------------------------------------------------------------- Jargon File, Devil's Dictionary, FOLDOC

def clean_jargon(article):
    """Unwrap {cross references}; drop the empty pronunciation marks ("//") of many entries."""
    # the conversion wrapped some lines between a reference and its ending: "{proglet}\n    s."
    text = re.sub(r"\}\n[ \t]*(s|es|ed|ing)(?=[\s.,;:)!?])", r"}\1", article)
    return _tidy(re.sub(r"(?m)^[ \t]*//[ \t]*$", "", _unbrace(text)))


def clean_devil(article):
    return _tidy(article)


# {text (target)}: a link whose target is a URL, a page or another entry; {(target)} shows the target
FOLDOC_LINK = re.compile(r"\{(?:(\S[^{}()]*?)\s+)?\(([^(){}]+)\)\}")  # not {x : P(x)}


def clean_foldoc(article):
    """Keep the headword line but not its aliases, drop <category> tags, link targets and the
    (yyyy-mm-dd) edit dates, unwrap {cross references}."""
    head, _, body = _tidy(article).partition("\n\n")
    body = FOLDOC_LINK.sub(lambda m: m.group(1) or m.group(2), body)
    body = re.sub(r"__([^_\n]+)__", r"\1", body)  # __emphasis__
    body = re.sub(r"(?m)^((?:\d+\.\s+)?)<[^<>\n]+>\s*", r"\1", body)
    body = re.sub(r"(?m)^\(\d{4}-\d\d-\d\d\)$", "", body)
    body = html.unescape(_unbrace(body))
    return _tidy(head.split("\n")[0] + "\n" + body)


def parse_dictd(name, index_path, dict_path, clean):
    """A dictd database -> one document per article (dictfmt's own entries left out)."""
    docs, seen = [], {}
    for heads, article in read_dictd(index_path, dict_path):
        if _is_meta(heads):
            continue
        text = clean(article)
        if not text:
            continue
        title = heads[0]
        seen[title] = seen.get(title, 0) + 1  # GCIDE has several articles per headword (verb, noun, ...)
        suffix = f"#{seen[title]}" if seen[title] > 1 else ""
        docs.append(Document(text, name, f"{name}/{title}{suffix}", title))
    return docs


# ---------------------------------------------------------------- WordNet

WORDNET_POS = (("noun", "noun"), ("verb", "verb"), ("adj", "adjective"), ("adv", "adverb"))


def parse_wordnet_data(lines, pos_name):
    """A WordNet `data.<pos>` file -> one document per synset: its words, part of speech and gloss
    (definition and quoted examples). The licence header lines start with two spaces."""
    docs = []
    for line in lines:
        if line.startswith("  ") or " | " not in line:
            continue
        fields, gloss = line.split(" | ", 1)
        fields = fields.split()
        try:
            offset, ss_type, count = fields[0], fields[2], int(fields[3], 16)
        except (IndexError, ValueError):
            raise SourceUnavailable(f"a WordNet data.* line is not a synset ({line[:60]!r}); delete the "
                                    f"wordnet-base .deb so it is downloaded again") from None
        # adjectives carry a syntactic marker after the word: happy(a), galore(ip)
        words = [re.sub(r"\((?:a|p|ip)\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * count:2]]
        gloss = gloss.strip()
        if words and gloss:
            text = f"{', '.join(words)} ({pos_name}): {gloss}"
            docs.append(Document(text, "wordnet", f"wordnet/{ss_type}{offset}", words[0]))
    return docs


def parse_wordnet_dir(folder):
    folder = Path(folder)
    docs = []
    for suffix, pos_name in WORDNET_POS:
        path = folder / f"data.{suffix}"
        if not path.exists():
            raise SourceUnavailable(f"{folder} has no data.{suffix}; delete the wordnet-base .deb "
                                    f"so it is downloaded again")
        docs += parse_wordnet_data(path.read_text(encoding="utf-8", errors="replace").splitlines(), pos_name)
    return docs


# ---------------------------------------------------------------- loaders

def _debian_files(package, cache_dir, wanted, meta):
    """apt-get download + dpkg-deb -x one package into the cache (no root); the extracted root."""
    if not have_apt():
        raise SourceUnavailable("needs apt-get and dpkg-deb (Debian/Ubuntu)")
    deb = apt_download(package, cache_dir)
    root = Path(cache_dir) / package
    if not all((root / w).exists() for w in wanted):
        deb_extract(deb, root)
    missing = [w for w in wanted if not (root / w).exists()]
    if missing:
        raise SourceUnavailable(f"{deb.name} has no {missing[0]}; delete it so it is downloaded again")
    if meta is not None:
        meta["package_file"] = deb.name  # the licences are recorded in ebt/data/sources.py SOURCES
    return root


def _dictd_loader(name, package, clean):
    def load(cache_dir, meta=None):
        files = [f"usr/share/dictd/{name}.index", f"usr/share/dictd/{name}.dict.dz"]
        root = _debian_files(package, cache_dir, files, meta)
        return parse_dictd(name, root / files[0], root / files[1], clean)
    load.__name__ = f"load_{name}"
    return load


load_gcide = _dictd_loader("gcide", "dict-gcide", clean_gcide)
load_jargon = _dictd_loader("jargon", "dict-jargon", clean_jargon)
load_devil = _dictd_loader("devil", "dict-devil", clean_devil)
load_foldoc = _dictd_loader("foldoc", "dict-foldoc", clean_foldoc)


def load_wordnet(cache_dir, meta=None):
    files = [f"usr/share/wordnet/data.{suffix}" for suffix, _ in WORDNET_POS]
    root = _debian_files("wordnet-base", cache_dir, files, meta)
    return parse_wordnet_dir(root / "usr/share/wordnet")
