"""Float8 matrix products with per-tensor current scaling, for FP8 tensor cores (H100 on).

The forward operands are rounded to float8_e4m3fn and the output gradient to float8_e5m2,
each divided first by a power of two fitted to its own absolute maximum in this step (no
scale history to keep in the train state); products accumulate in the compute dtype. It is
written as quantize-dequantize around an ordinary dot_general, the form XLA's GPU compiler
rewrites into cuBLASLt's FP8 matmul (convert from float8, times a scalar scale, into a dot).
Elsewhere it runs as an emulation: the same rounding, matmuls at the compute dtype's speed.
"""

import jax
from jax import lax
import jax.numpy as jnp

FORWARD_DTYPE = jnp.float8_e4m3fn  # more mantissa: activations and weights
GRADIENT_DTYPE = jnp.float8_e5m2  # more range: gradients


def current_scale(x, dtype):
  """The smallest power of two s (float32) with max|x| / s within `dtype`'s finite range;
  1 if x is all zero. A power of two, so dividing by it and multiplying back are exact."""
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  mantissa, exponent = jnp.frexp(amax / float(jnp.finfo(dtype).max))  # mantissa in [0.5, 1)
  exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)  # an exact power of two
  return jnp.where(amax > 0, jnp.ldexp(jnp.float32(1), exponent), jnp.float32(1))


def quantize(x, dtype):
  """(q, scale): x / scale rounded to float8 `dtype` (saturating), and the scale."""
  scale = current_scale(x, dtype)
  limit = float(jnp.finfo(dtype).max)
  return jnp.clip(x.astype(jnp.float32) / scale, -limit, limit).astype(dtype), scale


def quantize_dequantize(x, dtype):
  """x rounded through float8 `dtype` and back to x's dtype."""
  q, scale = quantize(x, dtype)
  return q.astype(x.dtype) * scale.astype(x.dtype)


@jax.custom_vjp
def _forward_rounded(x):
  return quantize_dequantize(x, FORWARD_DTYPE)


def _forward_rounded_fwd(x):
  return quantize_dequantize(x, FORWARD_DTYPE), None


def _forward_rounded_bwd(_, grad):
  return (grad,)  # straight through: the rounding has no useful derivative


_forward_rounded.defvjp(_forward_rounded_fwd, _forward_rounded_bwd)


@jax.custom_vjp
def _gradient_rounded(y):
  return y


def _gradient_rounded_fwd(y):
  return y, None


def _gradient_rounded_bwd(_, grad):
  return (quantize_dequantize(grad, GRADIENT_DTYPE),)


_gradient_rounded.defvjp(_gradient_rounded_fwd, _gradient_rounded_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
  """lax.dot_general on float8-rounded operands whose output gradient is float8-rounded too.

  Both backward products (input and weight gradients) then take float8 operands as well:
  the rounded output gradient and the forward's rounded operands.
  """
  out = lax.dot_general(_forward_rounded(lhs), _forward_rounded(rhs), dimension_numbers,
                        precision=precision, preferred_element_type=preferred_element_type,
                        **kwargs)
  return _gradient_rounded(out)
