"""Fake quantization of the projection matmuls, as Stable-SPAM trains in 4 (or 8) bits.

The scheme (docs/models.md has the full description) quantizes both operands of the
seven projections of every block in the forward pass and passes gradients straight
through:

    w̃ = w + sg(q_w(w) − w),   x̃ = x + sg(q_x(x) − x),   y = x̃ · w̃

so the weight gradient is computed from the dequantized activations and the input
gradient from the dequantized weights. Gradients themselves are not quantized.

* INT-b weights: asymmetric min–max, unsigned b bits, groups of `weight_group`
  consecutive elements of the weight flattened row-major **in PyTorch's
  `nn.Linear` layout (out_features, in_features)**. A Flax kernel is stored
  (in, out), so it is transposed to (out, in) before grouping; groups straddle
  rows when the input width is not a multiple of the group.
* INT-b activations: symmetric, signed b bits, groups of `act_group` consecutive
  elements of the activation flattened with the feature axis last; the `act_topk`
  largest magnitudes of each group are kept exactly; optional stochastic rounding.
* FP4 ("paper"): for weights and activations alike, top-k kept exactly and the rest
  rounded to the uniform 9-level grid {0, ±¼, ±½, ±¾, ±1}·α, α = max|rest|; this is
  what the official LLM-FP4-derived formula reduces to. "e2m1" is a true FP4 E2M1
  grid {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}·α/6 with the same grouping and top-k.

Rounding is round-half-to-even everywhere (like `torch.round`).

Sizes not divisible by the group size: the official code asserts divisibility
(`view(-1, group_size)`). We pad the last group instead, with values that do not take
part in its statistics (weights: the group's last element, which leaves min/max
unchanged; activations: zeros, which never exceed max|rest|), and drop the padding
after dequantizing. For divisible sizes — every official config at the official
batch shapes — the result is identical.

Why not AQT or Qwix: neither can express groups of 256 over the *flattened* tensor
(groups that straddle rows/tokens) nor keep the top-2 magnitudes of each group
exact, and Qwix's int4 path fails on the XLA CPU/GPU backends here. The scheme is
small, so it is written directly as a `dot_general` that is injected into the
projection layers (`models.linears.DenseGeneral`), the way AQT injects its own.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_WEIGHT_SCALE_EPS = 1e-5  # official: (max − min).clamp(min=1e-5)
_ACT_SCALE_EPS = 1e-6  # official: max|rest|.clamp_min(1e-6)

FP4_FORMATS = ("paper", "e2m1")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Which fake quantization the projections run; one object selects it all.

  The defaults reproduce what the official code effectively runs for
  `--weight_bits 4 --act_quant` (W4A4): activation bits and group follow the weight
  ones (`None` means "same as the weights"), top-2 kept exact, no stochastic
  rounding. Every setting can be changed independently.

  Attributes:
    weight_bits: bits of the INT weight quantizer (asymmetric, unsigned).
    weight_group: group size over the (out, in) row-major flattened weight.
    act_bits: bits of the INT activation quantizer (symmetric, signed);
      None → `weight_bits`.
    act_group: group size over the flattened activation; None → `weight_group`.
    act_topk: largest magnitudes per activation group kept exactly (also used by
      the FP4 quantizer for both operands).
    stochastic: stochastic rounding of the INT activations (uniform noise in
      [−0.5, 0.5) before rounding); needs a `"quant"` PRNG stream in `apply`.
    fp4: use the FP4 quantizer for weights and activations instead of INT.
    fp4_format: "paper" (uniform 9-level grid, what the official code runs) or
      "e2m1" (a true E2M1 grid).
    quantize_weights: fake-quantize the weights at all.
    quantize_acts: fake-quantize the activations at all.
  """

  weight_bits: int = 4
  weight_group: int = 256
  act_bits: int | None = None
  act_group: int | None = None
  act_topk: int = 2
  stochastic: bool = False
  fp4: bool = False
  fp4_format: str = "paper"
  quantize_weights: bool = True
  quantize_acts: bool = True

  def __post_init__(self):
    if self.fp4_format not in FP4_FORMATS:
      raise ValueError(f"fp4_format must be one of {FP4_FORMATS}, got {self.fp4_format!r}")
    for field in ("weight_bits", "weight_group", "act_group", "act_bits"):
      value = getattr(self, field)
      if value is not None and value < 2:
        raise ValueError(f"{field} must be >= 2, got {value}")
    if self.act_topk < 0 or self.act_topk >= self.resolved_act_group:
      raise ValueError(f"act_topk must be in [0, act_group), got {self.act_topk}")

  @property
  def resolved_act_bits(self) -> int:
    return self.weight_bits if self.act_bits is None else self.act_bits

  @property
  def resolved_act_group(self) -> int:
    return self.weight_group if self.act_group is None else self.act_group

  @property
  def needs_rng(self) -> bool:
    return self.stochastic and self.quantize_acts and not self.fp4


def get_quant_config(name: str | None, **overrides: Any) -> QuantConfig | None:
  """Named presets: "none"/"bf16" → None, "int4", "int8", "fp4", "fp4_e2m1"."""
  key = "none" if name is None else name.strip().lower()
  presets = {
      "int4": dict(weight_bits=4),
      "int8": dict(weight_bits=8),
      "fp4": dict(fp4=True, fp4_format="paper"),
      "fp4_e2m1": dict(fp4=True, fp4_format="e2m1"),
  }
  if key in ("none", "bf16", "bfloat16", "fp32", "float32"):
    if overrides:
      raise ValueError(f"quantization {name!r} takes no settings, got {sorted(overrides)}")
    return None
  if key not in presets:
    raise ValueError(
        f"unknown quantization {name!r}; valid: none, bf16, {', '.join(presets)}"
    )
  return QuantConfig(**{**presets[key], **overrides})


# ---------------------------------------------------------------------------
# Grouping over a flattened tensor.


def _groups(flat: jax.Array, group: int, pad_mode: str) -> jax.Array:
  n = flat.shape[0]
  pad = -n % group
  if pad:
    if pad_mode == "edge":
      # Repeat the last real element: the padded group's min/max are unchanged.
      flat = jnp.concatenate([flat, jnp.broadcast_to(flat[-1], (pad,))])
    else:
      flat = jnp.concatenate([flat, jnp.zeros((pad,), flat.dtype)])
  return flat.reshape(-1, group)


def _ungroup(groups: jax.Array, shape: Sequence[int]) -> jax.Array:
  n = 1
  for d in shape:
    n *= d
  return groups.reshape(-1)[:n].reshape(shape)


def _topk_mask(groups: jax.Array, topk: int) -> jax.Array:
  """True at the `topk` largest |x| of each group (ties broken by lower index)."""
  cols = jnp.arange(groups.shape[-1])
  if topk > 4:
    _, idx = lax.top_k(jnp.abs(groups), topk)
    return jnp.any(idx[..., :, None] == cols, axis=-2)
  # For the usual k = 2, repeated argmax is a pair of fusible reductions, cheaper
  # on GPU than a top-k (sort-based) kernel.
  a = jnp.abs(groups)
  keep = jnp.zeros(groups.shape, bool)
  for _ in range(topk):
    idx = jnp.argmax(jnp.where(keep, -1.0, a), axis=-1)
    keep = keep | (cols == idx[..., None])
  return keep


_ONE_PASS_TOPK = 2  # the largest k the single-reduction path below serves


def _ranks_before(v, i, w, j):
  """Whether (|x| = v at index i) ranks before (w, j): larger first, NaN largest (as
  `jnp.argmax`), ties to the lower index."""
  v_nan, w_nan = jnp.isnan(v), jnp.isnan(w)
  return jnp.where(v_nan | w_nan, v_nan & (~w_nan | (i < j)), (v > w) | ((v == w) & (i < j)))


def _merge_ranked(a: tuple, b: tuple) -> tuple:
  """The first m of two ranked lists of m (value, index) pairs, flattened as
  (v1, i1, v2, i2, …): the combiner of the one-pass top-k reduction."""
  m = len(a) // 2
  av, ai = list(a[0::2]), list(a[1::2])
  bv, bi = list(b[0::2]), list(b[1::2])
  out = []
  for _ in range(m):
    take_a = _ranks_before(av[0], ai[0], bv[0], bi[0])
    out += [jnp.where(take_a, av[0], bv[0]), jnp.where(take_a, ai[0], bi[0])]
    # The list taken from advances by one; the other stays.
    av, ai, bv, bi = ([jnp.where(take_a, x1, x0) for x0, x1 in zip(av, av[1:] + av[-1:])],
                      [jnp.where(take_a, x1, x0) for x0, x1 in zip(ai, ai[1:] + ai[-1:])],
                      [jnp.where(take_a, x0, x1) for x0, x1 in zip(bv, bv[1:] + bv[-1:])],
                      [jnp.where(take_a, x0, x1) for x0, x1 in zip(bi, bi[1:] + bi[-1:])])
  return tuple(out)


def _topk_and_rest_max(groups: jax.Array, topk: int) -> tuple[jax.Array, jax.Array]:
  """The mask of the `topk` largest |x| of each group (ties to the lower index) and the
  largest |x| of the rest, shape (groups, 1) (NaN when the rest holds a NaN).

  For k ≤ 2 (the official k is 2) on an accelerator, one variadic reduction ranks the
  k + 1 largest magnitudes of each group in a single read of the group
  (`_topk_in_one_pass`), instead of k argmax passes and a max pass over the rest
  (`_topk_by_passes`): compiled for an H100, that halves the bytes the W4A4 forward and
  backward add to the bf16 one at 60M (3.9 → 2.0 GB a step) and cuts them from 26.7 to
  15.3 GB at 350M. XLA:CPU runs the one-pass combiner element by element,
  slower than the passes, so a CPU keeps them; both give the same result.
  """
  if topk == 0:
    return jnp.zeros(groups.shape, bool), jnp.max(jnp.abs(groups), axis=-1, keepdims=True)
  if topk > _ONE_PASS_TOPK:
    return _topk_by_passes(groups, topk)
  return lax.platform_dependent(groups, cpu=functools.partial(_topk_by_passes, topk=topk),
                                default=functools.partial(_topk_in_one_pass, topk=topk))


def _topk_by_passes(groups: jax.Array, topk: int) -> tuple[jax.Array, jax.Array]:
  keep = _topk_mask(groups, topk)
  return keep, jnp.max(jnp.where(keep, 0.0, jnp.abs(groups)), axis=-1, keepdims=True)


def _topk_in_one_pass(groups: jax.Array, topk: int) -> tuple[jax.Array, jax.Array]:
  a = jnp.abs(groups)
  m = topk + 1
  cols = lax.broadcasted_iota(jnp.int32, groups.shape, groups.ndim - 1)
  last = jnp.iinfo(jnp.int32).max
  # Each element starts as a ranked list of one: itself, then m − 1 entries that rank
  # after every real one (−1 < any magnitude, the largest index).
  below = jnp.full(groups.shape, -1.0, a.dtype)
  after = jnp.full(groups.shape, last, jnp.int32)
  operands = (a, cols) + (below, after) * (m - 1)
  inits = (jnp.array(-1.0, a.dtype), jnp.array(last, jnp.int32)) * m
  ranked = lax.reduce(operands, inits, _merge_ranked, (groups.ndim - 1,))
  keep = functools.reduce(jnp.logical_or,
                          [cols == ranked[2 * r + 1][..., None] for r in range(topk)])
  return keep, ranked[2 * topk][..., None]


# ---------------------------------------------------------------------------
# The quantizers: value → dequantized value, float32 in and out, no gradients.


def _min_max_dequantized(x: jax.Array, bits: int, axis: int) -> jax.Array:
  """Asymmetric min–max INT-b of `x` (float32), each group running along `axis`."""
  max_int = 2**bits - 1
  mx = jnp.max(x, axis=axis, keepdims=True)
  mn = jnp.min(x, axis=axis, keepdims=True)
  scale = jnp.maximum(mx - mn, _WEIGHT_SCALE_EPS) / max_int
  zero = jnp.clip(-jnp.round(mn / scale), 0, max_int)
  q = jnp.clip(jnp.round(x / scale) + zero, 0, max_int)
  return (q - zero) * scale


def quantize_weight_int(w: jax.Array, bits: int, group: int) -> jax.Array:
  """Asymmetric min–max INT-b over groups of the row-major flattened `w`."""
  x = _groups(w.astype(jnp.float32).reshape(-1), group, "edge")
  return _ungroup(_min_max_dequantized(x, bits, -1), w.shape)


def quantize_weight_int_columns(w: jax.Array, bits: int, group: int) -> jax.Array:
  """`quantize_weight_int(w.T).T` for a 2-D `w` in (in, out) layout whose `in` is a
  multiple of `group`, without transposing: the groups of each column's `group`
  consecutive elements are the groups of the (out, in) flattening, none straddling rows."""
  n_in, n_out = w.shape
  if n_in % group:
    raise ValueError(f"the input width {n_in} is not a multiple of the group {group}")
  x = w.astype(jnp.float32).reshape(n_in // group, group, n_out)
  return _min_max_dequantized(x, bits, 1).reshape(n_in, n_out)


def quantize_act_int(
    x: jax.Array,
    bits: int,
    group: int,
    topk: int = 2,
    noise_key: jax.Array | None = None,
) -> jax.Array:
  """Symmetric INT-b with the top-k magnitudes of each group kept exactly.

  Groups run over `x` flattened row-major (feature axis last). With `noise_key`,
  uniform noise in [−0.5, 0.5) is added before rounding (stochastic rounding).
  """
  g = _groups(x.astype(jnp.float32).reshape(-1), group, "zero")
  keep, rest_max = _topk_and_rest_max(g, topk)
  rest = jnp.where(keep, 0.0, g)
  s = jnp.maximum(rest_max, _ACT_SCALE_EPS)
  qmax = 2 ** (bits - 1) - 1
  y = rest * (qmax / s)
  if noise_key is not None:
    y = y + jax.random.uniform(noise_key, y.shape, jnp.float32, -0.5, 0.5)
  q = jnp.clip(jnp.round(y), -qmax - 1, qmax)
  return _ungroup(jnp.where(keep, g, q * s / qmax), x.shape)


_E2M1_MAX = 6.0


def _round_e2m1(y: jax.Array) -> jax.Array:
  """Rounds |y| ≤ 6 to the nearest E2M1 value, ties to an even mantissa."""
  a = jnp.abs(y)
  step = jnp.where(a < 2.0, 0.5, jnp.where(a < 4.0, 1.0, 2.0))
  return jnp.sign(y) * jnp.minimum(jnp.round(a / step) * step, _E2M1_MAX)


def quantize_fp4(
    x: jax.Array, group: int, topk: int = 2, fmt: str = "paper"
) -> jax.Array:
  """FP4 over groups of the flattened `x`, the top-k magnitudes kept exactly.

  "paper": round(x / (α/4)) · α/4 on {−4..4}, α = max|rest| (the official grid).
  "e2m1": the E2M1 grid scaled so that α maps to 6.
  """
  g = _groups(x.astype(jnp.float32).reshape(-1), group, "zero")
  keep, rest_max = _topk_and_rest_max(g, topk)
  rest = jnp.where(keep, 0.0, g)
  alpha = jnp.maximum(rest_max, _ACT_SCALE_EPS)
  if fmt == "paper":
    step = alpha / 4.0
    deq = jnp.clip(jnp.round(rest / step), -4.0, 4.0) * step
  elif fmt == "e2m1":
    deq = _round_e2m1(rest * (_E2M1_MAX / alpha)) * (alpha / _E2M1_MAX)
  else:
    raise ValueError(f"unknown fp4 format {fmt!r}")
  return _ungroup(jnp.where(keep, g, deq), x.shape)


# ---------------------------------------------------------------------------
# Straight-through fake quantization and the injected dot_general.


def straight_through(x: jax.Array, quantizer: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """`x + sg(q(x) − x)` computed in float32, returned in `x`'s dtype.

  The forward value is q(x); the gradient is the identity.
  """
  x32 = x.astype(jnp.float32)
  delta = lax.stop_gradient(quantizer(lax.stop_gradient(x32)) - x32)
  return (x32 + delta).astype(x.dtype)


def quantize_weight(cfg: QuantConfig, w: jax.Array) -> jax.Array:
  """Dequantized weight (no STE); `w` in PyTorch (out, in) layout."""
  if cfg.fp4:
    return quantize_fp4(w, cfg.weight_group, cfg.act_topk, cfg.fp4_format)
  return quantize_weight_int(w, cfg.weight_bits, cfg.weight_group)


def quantize_act(cfg: QuantConfig, x: jax.Array, noise_key: jax.Array | None = None) -> jax.Array:
  """Dequantized activation (no STE); `x` with the feature axis (axes) last."""
  if cfg.fp4:
    return quantize_fp4(x, cfg.resolved_act_group, cfg.act_topk, cfg.fp4_format)
  return quantize_act_int(
      x, cfg.resolved_act_bits, cfg.resolved_act_group, cfg.act_topk, noise_key
  )


def _moved(x: jax.Array, front: Sequence[int], back: Sequence[int]):
  """Transposes `x` to (front…, other…, back…) and returns the inverse permutation."""
  rest = [d for d in range(x.ndim) if d not in front and d not in back]
  perm = list(front) + rest + list(back)
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return jnp.transpose(x, perm), inv


def fake_quant_activation(
    cfg: QuantConfig, x: jax.Array, batch_axes: Sequence[int], contracting_axes: Sequence[int],
    noise_key: jax.Array | None = None,
) -> jax.Array:
  """The activation operand of a projection, fake-quantized with a straight-through
  estimator: grouped in (batch…, free…, contracting…) order, i.e. feature axes last."""
  if not cfg.quantize_acts:
    return x
  moved, inv = _moved(x, batch_axes, contracting_axes)
  quant = functools.partial(quantize_act, cfg, noise_key=noise_key)
  return jnp.transpose(straight_through(moved, quant), inv)


def fake_quant_weight(cfg: QuantConfig, w: jax.Array, contracting_axes: Sequence[int]) -> jax.Array:
  """The weight operand of a projection, fake-quantized with a straight-through estimator:
  grouped in PyTorch's (out, in) order — non-contracting axes first, contracting axes last.

  An INT kernel laid out (in…, out…) whose input width is a multiple of the group is
  grouped where it lies (`quantize_weight_int_columns`, the same values) instead of being
  transposed to (out, in) and back."""
  if not cfg.quantize_weights:
    return w
  n_in_axes = len(contracting_axes)
  n_in = functools.reduce(lambda a, b: a * b, w.shape[:n_in_axes], 1)
  if (not cfg.fp4 and tuple(contracting_axes) == tuple(range(n_in_axes))
      and n_in % cfg.weight_group == 0):
    # The usual kernel, (in…, out…) with whole groups per column: grouped where it lies.
    columns = functools.partial(quantize_weight_int_columns, bits=cfg.weight_bits,
                                group=cfg.weight_group)
    return straight_through(w.reshape(n_in, -1), columns).reshape(w.shape)
  moved, inv = _moved(w, (), contracting_axes)
  return jnp.transpose(straight_through(moved, functools.partial(quantize_weight, cfg)), inv)


def fake_quant_dot_general(cfg: QuantConfig, noise_key: jax.Array | None = None) -> Callable:
  """A `lax.dot_general` replacement whose lhs is the activation and rhs the weight.

  Both operands are fake-quantized (`fake_quant_activation`, `fake_quant_weight`), then
  multiplied with the ordinary `lax.dot_general`.
  """
  if cfg.needs_rng and noise_key is None:
    raise ValueError("stochastic rounding needs a PRNG key (a 'quant' rng stream in apply)")

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    if rhs_b:
      raise ValueError("fake-quantized dot_general expects a weight without batch axes")
    lhs = fake_quant_activation(cfg, lhs, lhs_b, lhs_c, noise_key)
    rhs = fake_quant_weight(cfg, rhs, rhs_c)
    # The weight arrives in the parameter dtype (float32) so that it is grouped and
    # quantized from the master copy; the matmul itself runs in the compute dtype.
    rhs = rhs.astype(lhs.dtype)
    return lax.dot_general(
        lhs, rhs, dimension_numbers, precision=precision,
        preferred_element_type=preferred_element_type,
    )

  return dot_general
