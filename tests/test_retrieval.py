"""retrieval_metrics against a brute-force ranking written independently of it."""

import numpy as np
import pytest

from xmodal_jax.eval import retrieval


def brute_force_ranks(q, g, qids, gids):
  """Sort the gallery by score; the rank is the position of the first positive (1-based).

  Ties are broken in the positive's favour, as DESIGN.md's "strictly higher" count does.
  """
  ranks = []
  for i in range(len(q)):
    scores = g @ q[i]
    order = sorted(range(len(g)), key=lambda j: (-scores[j], gids[j] != qids[i]))
    ranks.append(1 + next(r for r, j in enumerate(order) if gids[j] == qids[i]))
  return np.array(ranks)


def reference_metrics(ranks):
  return {"R@1": 100 * np.mean(ranks <= 1), "R@5": 100 * np.mean(ranks <= 5),
          "R@10": 100 * np.mean(ranks <= 10), "MedR": np.median(ranks), "MnR": np.mean(ranks)}


@pytest.mark.parametrize("direction", ["image->text", "text->image"])
def test_flickr_protocol_five_captions_per_image(direction):
  rng = np.random.default_rng(0)
  n_images, d = 50, 16
  image_ids = np.arange(n_images)
  text_ids = np.repeat(image_ids, 5)
  images = rng.normal(size=(n_images, d)).astype(np.float32)
  texts = (np.repeat(images, 5, axis=0) + 2.0 * rng.normal(size=(5 * n_images, d))).astype(
      np.float32)
  if direction == "image->text":
    args = (images, texts, image_ids, text_ids)
  else:
    args = (texts, images, text_ids, image_ids)
  metrics = retrieval.retrieval_metrics(*args)
  expected = reference_metrics(brute_force_ranks(*args))
  for key, value in expected.items():
    assert metrics[key] == pytest.approx(value), key
  assert 0 < metrics["R@1"] < 100  # The data is neither trivial nor hopeless.


def test_ties_count_only_strictly_higher_scores():
  q = np.array([[1.0, 0.0]], np.float32)
  g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  metrics = retrieval.retrieval_metrics(q, g, np.array([7]), np.array([3, 7, 4]))
  assert metrics["R@1"] == 100.0


def test_query_without_positive_is_reported_not_scored():
  q = np.eye(2, dtype=np.float32)
  metrics = retrieval.retrieval_metrics(q, q, np.array([0, 5]), np.array([0, 1]))
  assert metrics["unmatched_queries"] == 1
  assert metrics["R@1"] == 100.0


def test_chance_recall_single_positive():
  ids = np.arange(200)
  assert retrieval.chance_recall(ids, ids, 1) == pytest.approx(0.5)
  assert retrieval.chance_recall(ids, ids, 10) == pytest.approx(5.0)


def test_evaluate_pairs_names_every_ordered_pair():
  rng = np.random.default_rng(1)
  emb = {m: rng.normal(size=(30, 4)).astype(np.float32) for m in ("audio", "video", "text")}
  masks = {m: np.ones(30, bool) for m in emb}
  masks["audio"][:5] = False
  out = retrieval.evaluate_pairs(emb, masks, np.arange(30), "test")
  pairs = {k.split("/")[1] for k in out}
  assert pairs == {"audio->video", "audio->text", "video->audio", "video->text",
                   "text->audio", "text->video"}
  expected = retrieval.retrieval_metrics(emb["audio"][5:], emb["text"], np.arange(5, 30),
                                         np.arange(30))
  assert out["test/audio->text/R@1"] == expected["R@1"]
