"""Sharded exact search on 8 simulated devices against dense NumPy references."""

import jax
import numpy as np
import pytest

from xmodal_jax.eval import retrieval, search


def dense_topk(queries, gallery, k):
  scores = queries @ gallery.T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # Ties: lower index first.
  return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("size,chunk", [(1000, 64), (997, 50), (13, 4096), (8 * 37 + 3, 7)])
def test_sharded_topk_equals_dense_argsort(size, chunk):
  assert jax.device_count() == 8
  rng = np.random.default_rng(size)
  gallery = rng.normal(size=(size, 16)).astype(np.float32)
  queries = rng.normal(size=(37, 16)).astype(np.float32)
  gallery[5] = gallery[3]  # An exact tie: the lower index must come first.
  queries[0] = gallery[3]
  k = min(10, size)
  scores, index = search.topk(queries, gallery, k, chunk_size=chunk, query_block=16)
  ref_scores, ref_index = dense_topk(queries, gallery, k)
  np.testing.assert_array_equal(index, ref_index)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
  assert index[0, 0] == 3 and index[0, 1] == 5


def test_sharded_ranks_equal_the_dense_protocol():
  rng = np.random.default_rng(1)
  gallery = rng.normal(size=(501, 8)).astype(np.float32)
  queries = rng.normal(size=(90, 8)).astype(np.float32)
  gallery_ids = rng.integers(0, 200, size=501) * 1_000_003  # Large, non-dense ids.
  query_ids = rng.integers(0, 230, size=90) * 1_000_003  # Some have no positive.
  ours = search.ranks(queries, gallery, query_ids, gallery_ids, chunk_size=16, query_block=32)
  expected = retrieval.query_ranks(queries, gallery, query_ids, gallery_ids)
  np.testing.assert_array_equal(ours, expected)
  assert (ours == 0).any() and (ours > 1).any()


def test_k_larger_than_gallery_is_an_error():
  with pytest.raises(ValueError, match="k=5 is larger than the gallery"):
    search.topk(np.zeros((1, 2)), np.zeros((3, 2)), 5)


def test_a_query_goes_through_the_modality_it_names():
  """A run with two audio modalities, sound and speech: an audio query goes through the
  first by name unless another is named; a name of another kind is refused."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from xmodal_jax.eval import query  # pylint: disable=g-import-not-at-top
  modalities = ml_collections.ConfigDict(dict(
      text=dict(kind="text"), sound=dict(kind="audio"), speech=dict(kind="audio")))
  assert query.query_modality(modalities, "audio") == "sound"
  assert query.query_modality(modalities, "audio", "speech") == "speech"
  with pytest.raises(ValueError, match=r"audio modalities are \['sound', 'speech'\], not 'text'"):
    query.query_modality(modalities, "audio", "text")
  with pytest.raises(ValueError, match=r"the config's image modalities are \[\]"):
    query.query_modality(modalities, "image")
