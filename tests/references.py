"""Independent computations and helpers the tests share."""

import contextlib
import functools
import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import peft_jax as pj
from peft_jax.models import bert, checkpoints, llama

# A 2-layer BERT small enough for exact checks (d = 16, 2 heads of 8, FFN 32).
TINY_BERT = bert.BertConfig(
  vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
)
# A 2-layer Llama (d = 64, 4 query heads and 2 key/value heads of 16, FFN 128).
TINY_LLAMA = llama.LlamaConfig(
  vocab_size=64,
  hidden_size=64,
  intermediate_size=128,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
)


@contextlib.contextmanager
def compiled_programs():
  """Collects the names (``'jit(step)'``) of the XLA programs compiled inside
  the block, one per compilation.

  A jitted function's ``_cache_size()`` says the same only in a fresh process:
  jax's C++ dispatch cache is one least-recently-used list of 8,192 call
  signatures for the whole process, so late in a long test run a function's
  entry is evicted within a few calls and the size reads 0.
  """
  names = []

  def record(event: str, duration: float, **kwargs):
    del duration
    if event == '/jax/core/compile/backend_compile_duration':
      names.append(kwargs['fun_name'])

  jax.monitoring.register_event_duration_secs_listener(record)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(record)


def tiny_bert_classifier(batch: int = 2, seq: int = 5):
  """``(model, frozen, ids, mask)``: a random ``TINY_BERT`` classifier (CLS
  pooling, 2 labels) and a batch whose example 1 ends in two padded tokens."""
  model = bert.BertForSequenceClassification(TINY_BERT, num_labels=2, pooling='cls')
  return (model, initialised(model), *tiny_bert_batch(batch, seq))


def tiny_bert_encoder(batch: int = 2, seq: int = 5):
  """``(model, frozen, ids, mask)``: a random ``TINY_BERT`` encoder and the
  batch of ``tiny_bert_classifier``."""
  model = bert.BertModel(TINY_BERT)
  return (model, initialised(model), *tiny_bert_batch(batch, seq))


def tiny_bert_batch(batch: int, seq: int):
  """Random ids and a mask whose example 1 ends in two padded tokens."""
  ids = jax.random.randint(jax.random.key(0), (batch, seq), 1, 50)
  return ids, jnp.ones_like(ids).at[1, -2:].set(0)


def initialised(model, seed: int = 1):
  """``model``'s random parameters from ``key(seed)``: initialised once per
  process (jitted; BERT's and Llama's weights do not depend on the input's
  shape), in new containers each call (callers may edit them)."""
  return jax.tree.map(lambda x: x, _initialised(model, seed))


@functools.cache
def _initialised(model, seed: int):
  ids = jnp.ones((1, 1), jnp.int32)
  return jax.jit(model.init)(jax.random.key(seed), ids)['params']


def perturb(tree, seed: int, scale: float = 0.3):
  """Every array of ``tree`` moved by ``scale · N(0, 1)`` noise (so checks are
  not trivial at an identity init). NumPy draws the noise: an eager
  ``jax.random.normal`` compiles a program for every new leaf shape."""
  rng = np.random.default_rng(seed)
  move = lambda x: jnp.asarray(
    np.asarray(x, np.float64) + scale * rng.standard_normal(np.shape(x)), x.dtype
  )
  return jax.tree.map(move, tree)


def houlsby_reference(y, params) -> np.ndarray:
  """``y + silu(y @ down + b_d) @ up + b_u``, written out in float64 NumPy."""
  f64 = lambda t: np.asarray(t, np.float64)
  pre = f64(y) @ f64(params.down) + f64(params.down_bias)
  return f64(y) + (pre / (1 + np.exp(-pre))) @ f64(params.up) + f64(params.up_bias)


def intercepting_houlsby(adapters: dict[tuple, object]):
  """Adds ``houlsby_reference`` to the outputs of the Dense modules at the
  given module paths by Flax method interception: a mechanism independent of
  hook points. Eager only (NumPy inside)."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = tuple(context.module.path)
    if context.method_name == '__call__' and path in adapters:
      return jnp.asarray(houlsby_reference(y, adapters[path]), y.dtype)
    return y

  return nn.intercept_methods(interceptor)


def sin_sum(out):
  """A loss whose gradient weights every output entry differently."""
  return jnp.sum(jnp.sin(out))


def outputs_and_grad(fn, loss=sin_sum, argnums=0):
  """``jit(args -> (fn(*args), grad of loss(fn(*args))))`` as one program.

  The gradient's program computes the outputs anyway; returning them too
  compiles one program where a jitted forward and a jitted gradient
  compile two (compilation dominates the tests' run time)."""

  def with_outputs(*args):
    out = fn(*args)
    return loss(out), out

  grad = jax.grad(with_outputs, argnums=argnums, has_aux=True)
  return jax.jit(lambda *args: grad(*args)[::-1])


def train(loss_fn, tree, frozen, params, buffers, batch, *, steps, lr, factored=False):
  """``(state, losses)`` after ``steps`` jitted Adam steps of
  ``pj.make_train_step`` on one batch (``losses[i]`` before step ``i``'s update)."""
  optimizer = optax.adam(lr)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(1))
  step = jax.jit(pj.make_train_step(loss_fn, tree, optimizer, factored=factored))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, frozen, batch)
    losses.append(float(metrics['loss']))
  return state, losses


# ---------------------------------------------------------------------------
# Fixtures that Hugging Face PEFT wrote (tests/fixtures/make_*_fixture.py):
# tiny models built from a transformers config with seeded random weights.

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def hf_fixture(name: str) -> dict[str, np.ndarray]:
  """The arrays of ``tests/fixtures/{name}_hf.npz``; skips the calling test
  when that file has not been generated."""
  path = FIXTURES / f'{name}_hf.npz'
  if not path.exists():
    pytest.skip(
      f'{path.name} not generated: run tests/fixtures/make_{name}_fixture.py '
      'where torch, transformers and peft are installed'
    )
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def _hf_base(arrays: dict, part: str) -> tuple[dict, dict[str, np.ndarray]]:
  """``(transformers config fields, base state dict)`` of fixture part
  ``part`` (keys ``part/config`` and ``part/base/<torch name>``; a fixture
  of one model, ``part=''``, keys ``config`` and ``base/<torch name>``)."""
  prefix = f'{part}/' if part else ''
  head = f'{prefix}base/'
  base = {k.removeprefix(head): v for k, v in arrays.items() if k.startswith(head)}
  return json.loads(str(arrays[f'{prefix}config'])), base


def hf_llama(arrays: dict, part: str = ''):
  """``(model, frozen)``: our ``LlamaForCausalLM`` with the fixture's HF
  ``LlamaForCausalLM`` config (``LlamaConfig.from_hf``) and weights
  (``llama.hf_layout``: kernels transposed)."""
  hf, base = _hf_base(arrays, part)
  config = llama.LlamaConfig.from_hf(transformers.LlamaConfig(**hf))
  frozen = checkpoints.convert(base, llama.hf_layout(config))
  return llama.LlamaForCausalLM(config), frozen


def hf_bert_classifier(arrays: dict, part: str):
  """``(model, frozen)``: our ``BertForSequenceClassification`` (CLS pooler,
  as HF's) with the fixture's HF config (``BertConfig.from_hf``) and weights
  (``bert.hf_layout``, and the classifier's ``weight`` transposed)."""
  hf, base = _hf_base(arrays, part)
  config = bert.BertConfig.from_hf(transformers.BertConfig(**hf))
  frozen = {
    'bert': checkpoints.convert(base, bert.hf_layout(config)),
    'classifier': {
      'kernel': jnp.asarray(base['classifier.weight'].T),
      'bias': jnp.asarray(base['classifier.bias']),
    },
  }
  model = bert.BertForSequenceClassification(
    config, num_labels=hf['num_labels'], pooling='cls'
  )
  return model, frozen


def slow_unless(names, fast):
  """``names`` as test parameters, those not in ``fast`` marked slow (run by
  `make test`, skipped by `make test-fast`)."""
  return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


_LAYOUT_OP = re.compile(
  r'\s*(?:ROOT )?%(\S+) = f32\[([\d,]*)\]\S* (copy|transpose|fusion)\('
)


def layout_copy_sizes(hlo: str) -> list[int]:
  """Element counts of the copies and transposes in compiled HLO text (plain
  ``copy``/``transpose`` ops and fusions XLA named after one)."""
  sizes = []
  for line in hlo.splitlines():
    match = _LAYOUT_OP.match(line)
    if match and (match[3] != 'fusion' or re.match(r'(copy|transpose)', match[1])):
      sizes.append(int(np.prod([int(d) for d in match[2].split(',') if d])))
  return sizes
