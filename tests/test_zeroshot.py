"""Zero-shot classification against a brute-force NumPy ranking written independently."""

import numpy as np
import pytest

from xmodal_jax import schema
from xmodal_jax.eval import zeroshot


def normalized(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(items, labels, prompts, k):
  """Per item: the class embedding is the renormalized mean of its prompts; the true class's
  rank counts classes scoring higher, or equal with a lower index."""
  classes = []
  for c in range(prompts.shape[0]):
    mean = sum(prompts[c, t].astype(np.float64) for t in range(prompts.shape[1]))
    classes.append(mean / np.sqrt(sum(v * v for v in mean)))
  hits = []
  for item, label in zip(items, labels):
    scores = [float(np.dot(item, c)) for c in classes]
    rank = sum(1 for c, s in enumerate(scores)
               if s > scores[label] or (s == scores[label] and c < label))
    hits.append(rank < k)
  return 100.0 * np.mean(hits)


def test_accuracies_match_a_brute_force_ranking_with_ties_and_templates():
  rng = np.random.default_rng(0)
  prompts = normalized(rng.normal(size=(7, 3, 5)))
  prompts[4] = prompts[2]  # classes 2 and 4 tie on every item: the lower index ranks first
  items = normalized(rng.normal(size=(40, 5)))
  labels = rng.integers(0, 7, 40)
  labels[:6] = [2, 4, 2, 4, 0, 6]
  metrics = zeroshot.classification_metrics(items, labels,
                                            zeroshot.class_embeddings(prompts), ks=(1, 5))
  for k in (1, 5):
    np.testing.assert_allclose(metrics[f"top{k}"], reference(items, labels, prompts, k))
  # Class 4 never ranks above class 2, so its items are never right at top-1.
  per_class = [reference(items[labels == c], labels[labels == c], prompts, 1)
               for c in np.unique(labels)]
  np.testing.assert_allclose(metrics["mean_per_class_recall"], np.mean(per_class))
  assert per_class[list(np.unique(labels)).index(4)] == 0.0


@pytest.mark.parametrize("options, message", [
    (dict(modality="smell"), r"zs.modality='smell': expected one of"),
    (dict(modality="audio", templates=("a sound",)), r"zs.templates: 'a sound' has no \{\}"),
    (dict(modality="audio", text="video"), r"zs.text='video': expected a text modality"),
])
def test_bad_zeroshot_options_name_the_field(options, message):
  from configs import audio_video_text  # pylint: disable=g-import-not-at-top
  config = audio_video_text.get_config("tiny")
  config.evals.zs = dict(type="zeroshot", every=6, **options)
  with pytest.raises(ValueError, match=message):
    schema.resolve(config, 8)
