"""The stdlib sentence sets (deterministic, disjoint, filtered) and the embedding metrics."""
import numpy as np
import pytest

from experiments.pretrained import metrics, sentences


def test_sentence_sets_are_deterministic_disjoint_and_filtered():
  ev, cal = sentences.evaluation(700), sentences.calibration(128)
  assert len(ev) == 700 and len(cal) == 128
  assert len(set(ev)) == 700 and not set(ev) & set(cal)
  assert sentences.evaluation(700) == ev  # same extraction every time
  assert sentences.evaluation(10) == ev[:10]  # a prefix, not a resample
  for s in ev + cal:
    assert sentences.keep(s)
  assert all(sentences.is_calibration(s) for s in cal)
  assert not any(sentences.is_calibration(s) for s in ev)
  with pytest.raises(ValueError, match="exceeds"):
    sentences.calibration(10 ** 6)


def test_first_sentence_rules():
  doc = "Return the thing.  More text.\n\nSecond paragraph."
  assert sentences.first_sentence(doc) == "Return the thing."
  assert sentences.first_sentence("Wrapped over\ntwo lines? yes") == "Wrapped over two lines?"
  assert sentences.first_sentence("Version 3.11 is here") == "Version 3.11 is here"
  assert not sentences.keep("Return x_y of the given thing here.")  # code-like '_'
  assert not sentences.keep("lower case start of a sentence here.")
  assert not sentences.keep("Too short.")


def test_metrics_on_hand_made_embeddings():
  f = np.eye(4)[:, :3] + np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [0.9, 0.1, 0]])
  # f rows: e0, e1, e2, (0.9, 0.1, 0) -> row 3's nearest is row 0, row 0's nearest is 3.
  assert metrics.neighbours(f, 1)[:, 0].tolist() == [3, 3, 0, 0]
  q = f.copy()
  q[3] = [0.1, 0.9, 0]  # now row 3 is nearest to row 1
  m = metrics.compare(f, q)
  # Rows 0 and 1 still find row 3 nearest, row 2 (all ties) row 0; row 3 now finds row 1.
  assert m["top1"] == pytest.approx(3 / 4)
  cos3 = (0.9 * 0.1 + 0.1 * 0.9) / (0.9 ** 2 + 0.1 ** 2)
  assert m["cos_min"] == pytest.approx(cos3)
  assert m["cos_mean"] == pytest.approx((3 + cos3) / 4)
  assert metrics.topk_agreement(f, 2.0 * f, 3) == 1.0  # scale does not matter
  with pytest.raises(ValueError, match="k=4"):
    metrics.neighbours(f, 4)


def test_topk_agreement_counts_overlap():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(30, 5))
  assert metrics.topk_agreement(f, f, 10) == 1.0
  g = rng.normal(size=(30, 5))
  nf, ng = metrics.neighbours(f, 10), metrics.neighbours(g, 10)
  expected = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(nf, ng)])
  assert metrics.topk_agreement(f, g, 10) == pytest.approx(expected)
  assert metrics.topk_agreement(f, g, 10) < 1.0
