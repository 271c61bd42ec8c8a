"""Pure Flax Linen modules: encoders, pooling and the multi-modal model. No data, no losses."""
