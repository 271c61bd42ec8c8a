"""BERT, RoBERTa, XLM-R and MiniLM (BertModel / RobertaModel layout)."""

from xmodal_jax.models import text
from xmodal_jax.pretrained.weights import activation, block, dense, embedding, layer_norm


def bert_tower(config, model_type, overrides):
  if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
    raise ValueError(f"position_embedding_type={config.position_embedding_type!r}: only "
                     "absolute positions are supported")
  kwargs = dict(
      vocab_size=config.vocab_size, width=config.hidden_size,
      num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
      mlp_dim=config.intermediate_size, max_positions=config.max_position_embeddings,
      type_vocab_size=config.type_vocab_size, pad_token_id=config.pad_token_id or 0,
      positions_after_padding_id=model_type != "bert", activation=activation(config),
      layer_norm_eps=config.layer_norm_eps, dropout=config.hidden_dropout_prob,
      attention_dropout=config.attention_probs_dropout_prob)
  return text.BertTextEncoder(**(kwargs | overrides))


def bert_params(w, tower):
  params = {
      "word_embeddings": embedding(w, "embeddings.word_embeddings.weight"),
      "position_embeddings": embedding(w, "embeddings.position_embeddings.weight"),
      "token_type_embeddings": embedding(w, "embeddings.token_type_embeddings.weight"),
      "embeddings_ln": layer_norm(w, "embeddings.LayerNorm"),
      "encoder": {f"block{i}": block(w, tower.num_heads, {
          "attn": [f"encoder.layer.{i}.attention.self.{n}" for n in ("query", "key", "value")]
                  + [f"encoder.layer.{i}.attention.output.dense"],
          "ln_attn": f"encoder.layer.{i}.attention.output.LayerNorm",
          "fc1": f"encoder.layer.{i}.intermediate.dense",
          "fc2": f"encoder.layer.{i}.output.dense",
          "ln_mlp": f"encoder.layer.{i}.output.LayerNorm"}) for i in range(tower.num_layers)},
  }
  if tower.pooling == "pooler":
    params["pooler"] = dense(w, "pooler.dense")
  return params
