"""Evaluation and calibration sentences: first sentences of Python standard-library docstrings.

Real English that every machine has, with no download. The set is defined by this
extraction and by the standard library of the running interpreter (CPython 3.11 here; a
different minor version has different docstrings, so numbers are comparable only within
one version; `describe()` records it). The extraction, fixed and deterministic:

  1. Modules: `MODULES`, in that order, read as source from `sysconfig`'s stdlib path
     (parsed with `ast`, never imported: no side effects).
  2. Docstrings in source order: the module's, then each top-level function and class
     and each function defined directly in a class body, depth first.
  3. First sentence: the docstring's first paragraph (up to a blank line), lines joined
     by single spaces, cut after the first '.', '!' or '?' followed by a space (or at the
     paragraph's end).
  4. Filters: 30..200 characters, ≥ 5 words, ASCII, starts with a capital letter, and no
     code-like text ('>>>', '::', '()', '=', '_', '`', '{', '|' or '*').
  5. Dedup: the first occurrence of each sentence (compared lower-cased) is kept.
  6. Split by content, not position: a sentence whose SHA-256 first byte is < 40 goes to
     calibration (about 1 in 6.4), the rest to evaluation; `calibration()` and
     `evaluation()` return the first `n` of each, in extraction order, so they are disjoint.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import os
import platform
import re
import sysconfig
from typing import List, Tuple

MODULES = (
    "argparse", "ast", "asyncio/events", "asyncio/tasks", "base64", "bisect", "calendar",
    "collections/__init__", "concurrent/futures/_base", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email/message",
    "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "heapq", "hmac", "html/parser", "http/client", "http/cookiejar",
    "http/server", "imaplib", "inspect", "ipaddress", "json/__init__", "json/decoder",
    "json/encoder", "locale", "logging/__init__", "logging/handlers", "mailbox",
    "mimetypes", "multiprocessing/pool", "netrc", "ntpath", "numbers", "optparse",
    "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib",
    "posixpath", "pprint", "pydoc", "queue", "random", "re/__init__", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "typing", "unittest/case", "urllib/parse", "urllib/request", "uuid", "warnings",
    "weakref", "xml/dom/minidom", "zipfile",
)
MIN_CHARS, MAX_CHARS, MIN_WORDS = 30, 200, 5
CALIBRATION_BYTE_BELOW = 40  # of 256: the share of sentences held out for calibration
_CODE_LIKE = (">>>", "::", "()", "=", "_", "`", "{", "|", "*")
_SENTENCE_END = re.compile(r"[.!?](?=\s)")


def _docstrings(tree: ast.Module) -> List[str]:
  out = []

  def visit(node, in_class_body):
    doc = ast.get_docstring(node, clean=True)
    if doc:
      out.append(doc)
    if isinstance(node, (ast.Module, ast.ClassDef)):
      for child in node.body:
        if isinstance(child, ast.ClassDef) or (
            isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))):
          visit(child, isinstance(node, ast.ClassDef))

  visit(tree, False)
  return out


def first_sentence(doc: str) -> str:
  """The first sentence of a docstring's first paragraph (rule 3)."""
  para = []
  for line in doc.strip().splitlines():
    if not line.strip():
      break
    para.append(line.strip())
  text = " ".join(para)
  m = _SENTENCE_END.search(text + " ")
  return text[:m.end()] if m else text


def keep(sentence: str) -> bool:
  """Rule 4's filters."""
  return (MIN_CHARS <= len(sentence) <= MAX_CHARS and len(sentence.split()) >= MIN_WORDS
          and sentence.isascii() and sentence[0].isupper()
          and not any(c in sentence for c in _CODE_LIKE))


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=1)
def all_sentences() -> Tuple[str, ...]:
  """Every sentence of the extraction (rules 1-5), in order (parsed once per process)."""
  root, seen, out = stdlib_dir(), set(), []
  for name in MODULES:
    path = os.path.join(root, name + ".py")
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    for doc in _docstrings(tree):
      s = first_sentence(doc)
      if keep(s) and s.lower() not in seen:
        seen.add(s.lower())
        out.append(s)
  return tuple(out)


def is_calibration(sentence: str) -> bool:
  """Rule 6: the split depends only on the sentence's text."""
  return hashlib.sha256(sentence.encode("utf-8")).digest()[0] < CALIBRATION_BYTE_BELOW


def _split(n: int, calibration: bool) -> List[str]:
  pool = [s for s in all_sentences() if is_calibration(s) == calibration]
  if n > len(pool):
    raise ValueError(f"n={n} exceeds the {len(pool)} {'calibration' if calibration else 'evaluation'} "
                     f"sentences of this stdlib ({stdlib_dir()})")
  return pool[:n]


def evaluation(n: int = 700) -> List[str]:
  """The first `n` evaluation sentences."""
  return _split(n, calibration=False)


def calibration(n: int = 128) -> List[str]:
  """The first `n` calibration sentences (disjoint from `evaluation`)."""
  return _split(n, calibration=True)


def describe() -> Tuple[str, int]:
  """(Python version the set comes from, number of extracted sentences)."""
  return platform.python_version(), len(all_sentences())
