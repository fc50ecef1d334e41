"""A retrieval corpus of real English text nobody on this project wrote: stdlib docstrings.

The first paragraph of the docstring of every public function, class and
method of a fixed list of Python standard-library modules, whitespace
collapsed, 40..600 characters, deduplicated, in a deterministic order. The
exact texts depend on the Python version (the count is reported with every
result).
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

__all__ = [
    "MODULES",
    "PLANNING_MODULES",
    "planning_docstrings",
    "stdlib_docstrings",
    "retrieval_split",
]

MODULES = (
    "argparse", "ast", "asyncio.events", "base64", "bisect", "calendar", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "ftplib",
    "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client",
    "http.cookiejar", "imaplib", "inspect", "ipaddress", "itertools", "json", "logging",
    "mailbox", "mimetypes", "multiprocessing.pool", "os", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "smtplib",
    "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest.case",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom",
    "zipfile",
)  # fmt: skip


def _first_paragraph(doc: str | None) -> str | None:
    if not doc:
        return None
    para = re.split(r"\n\s*\n", inspect.cleandoc(doc), maxsplit=1)[0]
    text = " ".join(para.split())
    if not (40 <= len(text) <= 600) or not re.search(r"[a-z]{3,} [a-z]{2,}", text):
        return None
    return text


#: Other modules, for planning/calibration texts disjoint from the evaluation corpus.
PLANNING_MODULES = (
    "abc", "array", "bz2", "cmd", "code", "codecs", "colorsys", "contextvars", "filecmp",
    "fileinput", "fnmatch", "getopt", "gettext", "graphlib", "io", "locale", "lzma", "netrc",
    "numbers", "operator", "optparse", "platform", "plistlib", "poplib", "quopri", "reprlib",
    "runpy", "socketserver", "stat", "symtable", "sysconfig", "tabnanny", "types", "wave",
    "webbrowser", "xml.etree.ElementTree", "email.utils", "http.server", "logging.handlers",
    "unittest.mock", "zipimport", "pdb", "trace", "tracemalloc", "doctest",
)  # fmt: skip


def stdlib_docstrings(limit: int | None = None, modules: tuple[str, ...] = MODULES) -> list[str]:
    """Docstring paragraphs of ``modules`` (deterministic order, no duplicates).

    ``modules`` defaults to :data:`MODULES` (the evaluation corpus);
    :data:`PLANNING_MODULES` gives texts for planning or calibration that
    share no module with it (a paragraph repeated in both can still occur).
    """
    seen: set[str] = set()
    out: list[str] = []

    def add(obj):
        text = _first_paragraph(getattr(obj, "__doc__", None))
        if text and text not in seen:
            seen.add(text)
            out.append(text)

    with warnings.catch_warnings():  # deprecated aliases (typing.re) warn on access
        warnings.simplefilter("ignore")
        _collect(add, modules)
    return out[:limit] if limit else out


def planning_docstrings(limit: int = 200) -> list[str]:
    """Up to ``limit`` paragraphs of :data:`PLANNING_MODULES` not in the evaluation corpus."""
    seen = set(stdlib_docstrings())
    return [t for t in stdlib_docstrings(modules=PLANNING_MODULES) if t not in seen][:limit]


def _collect(add, modules) -> None:
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:  # e.g. sqlite3 missing from a minimal Python
            continue
        for name in sorted(vars(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name)
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                add(obj)
            if inspect.isclass(obj):
                for attr in sorted(vars(obj)):
                    if not attr.startswith("_") and inspect.isfunction(vars(obj)[attr]):
                        add(vars(obj)[attr])


def retrieval_split(texts: list[str], n_queries: int) -> tuple[list[str], list[str]]:
    """Queries = the first sentence of every k-th text; corpus = all texts."""
    step = max(1, len(texts) // max(n_queries, 1))
    queries = []
    for t in texts[::step][:n_queries]:
        first = re.split(r"(?<=[.!?])\s", t, maxsplit=1)[0]
        queries.append(first)
    return queries, texts
