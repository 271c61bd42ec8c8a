"""retrieval_metrics against a brute-force ranking written independently of it."""

import numpy as np
import pytest

from xmodal_jax.eval import retrieval


def brute_force_ranks(q, g, qids, gids):
  """Sort the gallery by score; the rank is the position of the first positive (1-based).

  Ties are broken in the positive's favour, as the "strictly higher" count of docs/methods.md does.
  """
  ranks = []
  for i in range(len(q)):
    scores = g @ q[i]
    order = sorted(range(len(g)), key=lambda j: (-scores[j], gids[j] != qids[i]))
    ranks.append(1 + next(r for r, j in enumerate(order) if gids[j] == qids[i]))
  return np.array(ranks)


def reference_map10(q, g, qids, gids):
  """mAP@10 with a plain loop: rank the gallery (score descending, ties by index), average
  precision at each positive among the first 10, over min(#positives, 10)."""
  aps = []
  for i in range(len(q)):
    scores = g @ q[i]
    order = sorted(range(len(g)), key=lambda j: (-scores[j], j))[:10]
    hits, total = 0, 0.0
    for position, j in enumerate(order, start=1):
      if gids[j] == qids[i]:
        hits += 1
        total += hits / position
    aps.append(total / min(10, int(np.sum(gids == qids[i]))))
  return 100 * np.mean(aps)


def reference_metrics(ranks):
  recalls = {f"R@{k}": 100 * np.mean(ranks <= k) for k in (1, 5, 10)}
  return recalls | {"MedR": np.median(ranks), "MnR": np.mean(ranks),
                    "RSUM": sum(recalls.values())}


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
  expected["mAP@10"] = reference_map10(*args)
  for key, value in expected.items():
    assert metrics[key] == pytest.approx(value), key
  ranks = retrieval.retrieval_metrics(*args, return_ranks=True)["ranks"]
  np.testing.assert_array_equal(ranks, brute_force_ranks(*args))
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
                   "text->audio", "text->video", "audio+video->text", "audio+text->video",
                   "video+text->audio", "audio<->video", "audio<->text", "video<->text"}
  expected = retrieval.retrieval_metrics(emb["audio"][5:], emb["text"], np.arange(5, 30),
                                         np.arange(30))
  assert out["test/audio->text/R@1"] == expected["R@1"]


def test_fused_query_is_the_normalized_sum_over_items_having_both():
  rng = np.random.default_rng(2)
  emb = {m: rng.normal(size=(40, 6)).astype(np.float32) for m in ("audio", "video", "text")}
  masks = {m: np.ones(40, bool) for m in emb}
  masks["video"][::4] = False  # Those items cannot make an audio+video query.
  ids = np.arange(40)
  out = retrieval.evaluate_pairs(emb, masks, ids, "test", fused=["audio+video"])
  keep = masks["video"]
  fused = emb["audio"][keep] + emb["video"][keep]
  fused /= np.linalg.norm(fused, axis=1, keepdims=True)
  ranks = brute_force_ranks(fused, emb["text"], ids[keep], ids)
  assert out["test/audio+video->text/R@1"] == pytest.approx(100 * np.mean(ranks <= 1))
  assert out["test/audio+video->text/MnR"] == pytest.approx(np.mean(ranks))
  assert "test/audio+text->video/R@1" not in out
  with pytest.raises(ValueError, match="fused query 'audio\+sound'"):
    retrieval.evaluate_pairs(emb, masks, ids, "test", fused=["audio+sound"])


def test_class_level_modality_matches_by_class_once_per_class():
  """A species' attributes (identical for its photos): photo -> attributes is nearest-class
  classification among the classes; attributes -> photo queries once per class, and any
  photo of the class is a hit; photo <-> text still matches by item."""
  rng = np.random.default_rng(3)
  classes = np.repeat(np.arange(4), 5)  # 20 photos, 4 species
  class_vectors = rng.normal(size=(4, 8))
  emb = {"image": rng.normal(size=(20, 8)), "text": rng.normal(size=(20, 8)),
         "attributes": class_vectors[classes]}
  masks = {m: np.ones(20, bool) for m in emb}
  ids = np.arange(20)
  out = retrieval.evaluate_pairs(emb, masks, ids, "test", fused="none", class_ids=classes,
                                 class_level=("attributes",))
  nearest = np.argmax(emb["image"] @ class_vectors.T, axis=1)
  assert out["test/image->attributes/R@1"] == pytest.approx(100 * np.mean(nearest == classes))
  assert out["test/image->attributes/chance_R@1"] == pytest.approx(25.0)
  best_photo = np.argmax(class_vectors @ emb["image"].T, axis=1)
  assert out["test/attributes->image/R@1"] == pytest.approx(
      100 * np.mean(classes[best_photo] == np.arange(4)))
  ranks = brute_force_ranks(emb["image"], emb["text"], ids, ids)
  assert out["test/image->text/R@1"] == pytest.approx(100 * np.mean(ranks <= 1))


def test_console_tables_name_dataset_prefixes_and_show_zero_shot():
  columns = ["R@1", "R@5", "R@10", "MedR", "MnR", "mAP@10", "RSUM", "chance_R@1"]
  metrics = {f"msrvtt/test/{pair}/{c}": 1.0 for pair in ("text->video", "video->text")
             for c in columns}
  metrics |= {"esc50/zeroshot/audio/top1": 42.5, "esc50/zeroshot/audio/top5": 80.0,
              "esc50/zeroshot/audio/mean_per_class_recall": 41.0,
              "esc50/zeroshot/audio/chance_top1": 2.0}
  text = retrieval.format_tables(metrics)
  assert text.startswith("msrvtt/test\nquery->gallery")
  assert "text->video" in text and "video->text" in text
  zeroshot_line = [line for line in text.splitlines() if line.startswith("esc50 audio")]
  assert zeroshot_line and "42.50" in zeroshot_line[0] and "80.00" in zeroshot_line[0]
