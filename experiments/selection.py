"""The selection phase of selective runs (Fu et al.): score, mask, then rules.

A config with a ``selection`` block trains ``θ0 + M ⊙ Δ`` on the entries a
scorer of ``peft_jax.selection`` picks from the task's training stream,
before the first step and without changing a weight:

  config.selection = dict(
      scorer='sam',        # sam | fisher | magnitude | random | lt_sft
      p=0.005,             # the share of the scored entries that trains
      scope='per_leaf',    # per_leaf (the released code) | global (the paper)
      where='bert/.*',     # the scored leaves (regex on leaf names)
      batches=64,          # T, batches of the training stream scored (sam, fisher)
      curvature='',        # '' | lambda_max | hutchinson (sam)
      clip_norm=1.0,       # per-batch gradient clipping (sam; 0 = none)
      dense_steps=100,     # lt_sft: steps of the dense run that gives θ1
      dense_lr=1e-4,       # lt_sft: its learning rate
  )

The mask becomes ``peft_jax.sparse_rules(mask)``, put before the config's
own ``adapters`` rules (which still train e.g. the head). A resumed run
recomputes the same mask (same seed, same batches); the checkpointed
buffers hold its indices either way.
"""

import jax
import optax

import peft_jax as pj
from experiments import tasks
from peft_jax import selection

SCORERS = ('sam', 'fisher', 'magnitude', 'random', 'lt_sft')


def rules_for(config, task: tasks.Task) -> list:
  """The run's rules: ``sparse_rules(mask)`` first when there is a selection."""
  spec = config.get('selection')
  if not spec:
    return list(config.adapters)
  if spec.scorer not in SCORERS:
    known = ', '.join(SCORERS)
    raise pj.PeftError(f'selection.scorer={spec.scorer!r} is unknown; expected {known}')
  scores = _scores(config, spec, task)
  mask = selection.top_p(scores, spec.p, scope=spec.scope)
  print(f'selected {selection.count(mask):,} entries ({spec.scorer}, p={spec.p})')
  return pj.sparse_rules(mask) + list(config.adapters)


def _scores(config, spec, task: tasks.Task):
  key = jax.random.fold_in(jax.random.key(config.seed), 7)
  if spec.scorer == 'magnitude':
    return selection.magnitude(task.frozen, where=spec.where)
  if spec.scorer == 'random':
    return selection.random(key, task.frozen, where=spec.where)
  if spec.scorer == 'lt_sft':
    tuned = _dense_run(config, spec, task)
    return selection.lt_sft(task.frozen, tuned, where=spec.where)
  batches = (task.train_batch(t) for t in range(spec.batches))
  common = dict(where=spec.where, num_batches=spec.batches, rng=key)
  if spec.scorer == 'fisher':
    return selection.fisher(task.loss_fn, task.frozen, batches, **common)
  return selection.sam(
    task.loss_fn,
    task.frozen,
    batches,
    clip_norm=spec.clip_norm or None,
    curvature=spec.curvature or None,
    **common,
  )


def _dense_run(config, spec, task: tasks.Task):
  """θ1 of LT-SFT: ``dense_steps`` AdamW steps on every scored leaf (and the
  config's own rules), at ``dense_lr``; returns the merged weights."""
  tree = pj.by_rules([(spec.where, 'full()'), *config.adapters])
  optimizer = optax.adamw(spec.dense_lr, weight_decay=config.weight_decay)
  params, buffers = tree.init(jax.random.key(config.seed), task.frozen)
  state = pj.TrainState.create(params, buffers, optimizer, jax.random.key(config.seed))
  step = jax.jit(pj.make_train_step(task.loss_fn, tree, optimizer), donate_argnums=0)
  for t in range(spec.dense_steps):
    state, _ = step(state, task.frozen, task.train_batch(t))
  return pj.merge(tree, task.frozen, state.params, state.buffers)
