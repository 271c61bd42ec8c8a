"""Zero-shot classification (CLIP's protocol, any modality): each class name is put into
prompt templates, the text tower embeds them, each class's prompts are averaged in the
embedding space and renormalized; an item's class is the one whose embedding it scores
highest. Top-k counts ranks by score descending, ties by class index (as retrieval does)."""

import numpy as np

# Templates per classified kind when the evaluator gives none; "{}" is the class name.
DEFAULT_TEMPLATES = {
    "image": ("a photo of a {}.", "a picture of a {}.", "an image of the {}.", "{}"),
    "audio": ("the sound of a {}.", "a recording of {}.", "{}"),
    "video": ("a video of a {}.", "a clip of someone {}.", "{}"),
    "features": ("{}",),
    "text": ("{}",),
}


def class_embeddings(prompt_emb):
  """float[C, T, D] L2-normalized prompt embeddings -> float[C, D]: each class's mean over
  its T templates, renormalized."""
  mean = prompt_emb.astype(np.float64).mean(axis=1)
  return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def classification_metrics(item_emb, labels, class_emb, ks=(1, 5)):
  """{"top{k}": % of items whose class is among their k best, "mean_per_class_recall": the
  mean over classes with items of their top-1 recall %} for item_emb float[N, D], labels
  int[N] (class indices), class_emb float[C, D]."""
  scores = item_emb.astype(np.float64) @ class_emb.T
  ranking = np.argsort(-scores, axis=1, kind="stable")
  rank = np.argmax(ranking == labels[:, None], axis=1)
  metrics = {f"top{k}": 100.0 * float(np.mean(rank < k)) for k in ks if k <= len(class_emb)}
  recalls = [np.mean(rank[labels == c] < 1) for c in np.unique(labels)]
  metrics["mean_per_class_recall"] = 100.0 * float(np.mean(recalls))
  return metrics
