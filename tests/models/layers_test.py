"""layers.dense: nn.Dense's x @ w, gradients over one token axis (same values,
no transposed g), the forward unchanged for what reads the program; and
layers.gelu and layers.swiglu: recomputed in the backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from peft_jax.models import layers
from tests import references

X_AT_W = (((2,), (0,)), ((), ()))


def test_values_and_gradients_match_the_formula():
  kx, kw, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 5, 7))
  w = jax.random.normal(kw, (7, 4))
  t = jax.random.normal(kt, (3, 5, 4))
  loss = lambda x, w: jnp.sum(layers.token_dot_general(x, w, X_AT_W) * t)
  y = layers.token_dot_general(x, w, X_AT_W)
  gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)

  x64, w64, t64 = (np.asarray(a, np.float64) for a in (x, w, t))
  np.testing.assert_allclose(
    y, np.einsum('bsi,io->bso', x64, w64), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    gx, np.einsum('bso,io->bsi', t64, w64), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    gw, np.einsum('bsi,bso->io', x64, t64), rtol=1e-5, atol=1e-5
  )


def test_bf16_gradients_have_lax_dot_generals_dtypes_and_values():
  kx, kw, kt = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (2, 6, 8), jnp.bfloat16)
  w = jax.random.normal(kw, (8, 5), jnp.bfloat16)
  t = jax.random.normal(kt, (2, 6, 5), jnp.float32)

  def grads(dot_general, preferred):
    loss = lambda x, w: jnp.sum(dot_general(x, w, X_AT_W, None, preferred) * t)
    return jax.grad(loss, argnums=(0, 1))(x, w)

  for preferred in (None, jnp.float32):
    ours, theirs = (
      grads(layers.token_dot_general, preferred),
      grads(jax.lax.dot_general, preferred),
    )
    for a, b in zip(ours, theirs, strict=True):
      assert a.dtype == b.dtype == jnp.bfloat16
      np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2
      )


def test_the_program_keeps_the_sequence_axis_in_the_forward():
  """The jaxpr's dot sees ``(batch, seq, d_in)``: the factored path, which
  enters the custom VJP, hands a factored form the sequence axis."""
  x, w = jnp.ones((2, 6, 8)), jnp.ones((8, 5))
  jaxpr = jax.make_jaxpr(lambda x, w: layers.token_dot_general(x, w, X_AT_W))(x, w)
  (call,) = jaxpr.eqns
  assert call.primitive.name == 'custom_vjp_call'
  (dot,) = call.params['call_jaxpr'].eqns
  assert dot.primitive.name == 'dot_general'
  assert dot.invars[0].aval.shape == (2, 6, 8)


def test_dense_keeps_nn_dense_parameters_and_outputs():
  x = jax.random.normal(jax.random.key(1), (2, 6, 8))
  ours, theirs = layers.dense(5, 'proj'), nn.Dense(5, name='proj')
  params = theirs.init(jax.random.key(2), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(2), x)) == jax.tree.map(
    jnp.shape, params
  )
  np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6)


def test_other_dimension_numbers_are_a_clear_error():
  x, w = jnp.ones((2, 3)), jnp.ones((2, 4))
  with pytest.raises(ValueError, match=r'expected x @ w dimension numbers, got'):
    layers.token_dot_general(x, w, (((0,), (0,)), ((), ())))


def test_weight_gradient_does_not_transpose_the_output_gradient():
  """XLA:CPU transposes ``g`` for ``xᵀ g`` over (batch, seq); not over tokens."""
  x, w, t = jnp.ones((4, 64, 32)), jnp.ones((32, 48)), jnp.ones((4, 64, 48))

  def copies(dot_general):
    loss = lambda w: jnp.sum(jnp.tanh(dot_general(x, w, X_AT_W)) * t)
    return references.layout_copy_sizes(
      jax.jit(jax.grad(loss)).lower(w).compile().as_text()
    )

  assert t.size in copies(jax.lax.dot_general)  # the check can tell
  assert t.size not in copies(layers.token_dot_general)


def test_gelu_values_and_derivative_match_the_formula():
  # GELU(h) = h Φ(h), GELU'(h) = Φ(h) + h φ(h), in float64 from scipy's erf.
  h = jax.random.normal(jax.random.key(3), (4, 6, 9)) * 3.0
  t = jax.random.normal(jax.random.key(4), h.shape)
  value = layers.gelu(h)
  grad = jax.grad(lambda h: jnp.sum(layers.gelu(h) * t))(h)
  h64, t64 = np.asarray(h, np.float64), np.asarray(t, np.float64)
  cdf = 0.5 * (1.0 + special.erf(h64 / np.sqrt(2.0)))
  pdf = np.exp(-(h64**2) / 2.0) / np.sqrt(2.0 * np.pi)
  np.testing.assert_allclose(value, h64 * cdf, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, t64 * (cdf + h64 * pdf), rtol=1e-5, atol=1e-6)


def test_swiglu_values_and_gradients_match_the_formula():
  # f = g σ(g) u: ∂f/∂g = u σ(g) (1 + g (1 - σ(g))), ∂f/∂u = g σ(g), in float64.
  kg, ku, kt = jax.random.split(jax.random.key(6), 3)
  gate = jax.random.normal(kg, (3, 5, 8)) * 3.0
  up = jax.random.normal(ku, gate.shape)
  t = jax.random.normal(kt, gate.shape)
  value = layers.swiglu(gate, up)
  loss = lambda g, u: jnp.sum(layers.swiglu(g, u) * t)
  d_gate, d_up = jax.grad(loss, argnums=(0, 1))(gate, up)
  g64, u64, t64 = (np.asarray(a, np.float64) for a in (gate, up, t))
  sigmoid = 1.0 / (1.0 + np.exp(-g64))
  np.testing.assert_allclose(value, g64 * sigmoid * u64, rtol=1e-5, atol=1e-6)
  want_d_gate = t64 * u64 * sigmoid * (1.0 + g64 * (1.0 - sigmoid))
  np.testing.assert_allclose(d_gate, want_d_gate, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(d_up, t64 * g64 * sigmoid, rtol=1e-5, atol=1e-6)


def test_backward_keeps_only_the_inputs():
  # An FFN's gradient with frozen kernels: with the plain activation XLA keeps
  # its derivative's terms for the backward, with layers' only the inputs.
  kx, k1, k2 = jax.random.split(jax.random.key(5), 3)
  x = jax.random.normal(kx, (64, 32))
  w1 = jax.random.normal(k1, (32, 512))
  w2 = jax.random.normal(k2, (512, 32))

  def temp_bytes(act):
    def loss(x):
      return jnp.sum(jnp.tanh(act(jnp.tanh(x) @ w1) @ w2))

    compiled = jax.jit(jax.grad(loss)).lower(x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  plain = temp_bytes(lambda h: jax.nn.gelu(h, approximate=False))
  recomputed = temp_bytes(layers.gelu)
  assert recomputed < plain, (recomputed, plain)
  # SwiGLU of two projections of the same input, h and its reverse.
  plain = temp_bytes(lambda h: jax.nn.silu(h) * h[:, ::-1])
  recomputed = temp_bytes(lambda h: layers.swiglu(h, h[:, ::-1]))
  assert recomputed < plain, (recomputed, plain)


def attention_formula(q, k, v, visible):
  """o[b,t,i] = Σ_s softmax_s(q[b,t,i]·k[b,s,i//g]/√h, over visible s) v[b,s,i//g],
  head by head; a query that sees no key attends to all uniformly."""
  group = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(a, group, axis=2) for a in (k, v))
  logits = jnp.einsum('btih,bsih->bits', q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(visible, logits, -1e300)
  return jnp.einsum('bits,bsih->btih', jax.nn.softmax(logits, axis=-1), v)


ATTENTION_CASES = {
  'causal': dict(t=6, s=6, heads=4, kv_heads=2, mask=None, causal=True),
  # 128 tokens or more: computed as two halves of the queries.
  'causal, split in halves': dict(
    t=128, s=128, heads=4, kv_heads=2, mask=None, causal=True
  ),
  'padding mask, prefix keys': dict(t=5, s=8, heads=6, kv_heads=2, mask=(3, 1, 5, 8)),
  'per-head mask and causal': dict(
    t=5, s=7, heads=4, kv_heads=1, mask=(1, 4, 5, 7), causal=True
  ),
  'a query sees no key': dict(
    t=5, s=7, heads=4, kv_heads=2, mask=(3, 1, 5, 7), blind_row=2
  ),
  'no grouping, no mask': dict(t=4, s=4, heads=3, kv_heads=3, mask=None),
}


@pytest.mark.parametrize('case', ATTENTION_CASES)
def test_attention_values_and_gradients_match_the_formula(case):
  c = {'causal': False, 'blind_row': None, **ATTENTION_CASES[case]}
  rng = np.random.default_rng(len(case))
  b, h = 3, 8
  with jax.enable_x64():
    q = jnp.asarray(rng.standard_normal((b, c['t'], c['heads'], h)))
    k, v = (
      jnp.asarray(rng.standard_normal((b, c['s'], c['kv_heads'], h))) for _ in 'kv'
    )
    cotangent = jnp.asarray(rng.standard_normal(q.shape))
    mask = None if c['mask'] is None else jnp.asarray(rng.random(c['mask']) > 0.3)
    if c['blind_row'] is not None:
      mask = mask.at[:, :, c['blind_row'], :].set(False)
    visible = np.ones((1, 1, c['t'], c['s']), bool) if mask is None else mask
    if c['causal']:
      visible = visible & np.tril(np.ones((c['t'], c['s']), bool))
    out, vjp = jax.vjp(lambda *a: layers.attention(*a, mask, c['causal']), q, k, v)
    want, want_vjp = jax.vjp(lambda *a: attention_formula(*a, visible), q, k, v)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    for got, expected in zip(vjp(cotangent), want_vjp(cotangent), strict=True):
      np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_attention_matches_jax_dot_product_attention_in_bfloat16():
  kq, kk, kv, kt = jax.random.split(jax.random.key(8), 4)
  q = jax.random.normal(kq, (2, 16, 4, 32), jnp.bfloat16)
  k, v = (jax.random.normal(key, (2, 16, 2, 32), jnp.bfloat16) for key in (kk, kv))
  t = jax.random.normal(kt, q.shape, jnp.bfloat16)

  def vjp(attend):
    out, pullback = jax.vjp(attend, q, k, v)
    return out, *pullback(t)

  ours = vjp(lambda *a: layers.attention(*a, is_causal=True))
  jaxs = vjp(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True))
  for got, want in zip(ours, jaxs, strict=True):
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(
      np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0.05, atol=0.05
    )


def test_attention_backward_keeps_no_probabilities():
  # The (b, heads, t, s) probabilities are recomputed, not kept: the compiled
  # gradient's temporary buffers are smaller than jax.nn's by at least them.
  q = jnp.ones((4, 128, 8, 64))
  k = v = jnp.ones((4, 128, 2, 64))

  def temp_bytes(attend):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  ours = temp_bytes(lambda *a: layers.attention(*a, is_causal=True))
  jaxs = temp_bytes(lambda *a: jax.nn.dot_product_attention(*a, is_causal=True))
  probabilities = 4 * 8 * 128 * 128 * 4
  assert ours <= jaxs - probabilities, (ours, jaxs)


def test_attention_mask_of_another_shape_is_a_clear_error():
  q = jnp.ones((1, 3, 2, 4))
  with pytest.raises(ValueError, match=r'mask: expected bool \(batch, heads, t, s\)'):
    layers.attention(q, q, q, jnp.ones((3, 3)))
