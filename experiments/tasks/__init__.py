"""Tasks: a model, its data and its loss, built from a config.

Each task module has ``build(config) -> Task``; ``config.task`` names it.
"""

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import tqdm

import peft_jax as pj
from peft_jax.data import batching
from peft_jax.models import partitioning


class Task(NamedTuple):
  """What the trainer needs from a task.

  Attributes:
    frozen: the frozen parameter tree (pretrained model, plus a new head
      where the task has one).
    hooks: the model's hook points on an example batch
      (``peft_jax.hook_points``), for rules that select activation adapters.
    loss_fn: ``(weights, batch, rng) -> (loss, metrics)``.
    train_batch: ``step -> batch``, deterministic in the step.
    evaluate: ``(tree, frozen, params, buffers) -> {metric: float}`` on
      the validation and test splits (the first ``config.data.eval_limit``
      examples of each, and their count as ``<split>_examples``; see
      ``evaluation_split``), for the tree adapter and its
      parameters over ``frozen`` (the task's, or a copy placed on a mesh)
      (tasks run the model through ``peft_jax.adapted(..., factored=True)``,
      so non-mergeable and activation-side methods work).
    describe: one line on the model and data, for logs.
    adapter_metadata: what the run's adapter file records about the task
      (``peft_jax.save_adapter`` metadata), so ``peft_jax.from_pretrained``
      rebuilds the model from it: ``task``, ``base_model``, ``tokenizer``,
      ``labels`` (in logit order), ``max_length``, and ``head`` (a new head)
      or ``prompt`` where the task has them.
    param_axes: the model family's ``PARAM_AXES`` (logical axes of
      ``frozen``'s leaves, ``peft_jax.models.partitioning``), for placing
      it on a mesh; ``()`` replicates every leaf.
  """

  frozen: pj.Params
  hooks: dict[str, pj.HookPoint]
  loss_fn: Callable
  train_batch: Callable[[int], Any]
  evaluate: Callable[
    [pj.TreeAdapter, pj.Params, pj.AdapterParams, pj.Buffers], dict[str, float]
  ]
  describe: str
  adapter_metadata: dict[str, Any]
  param_axes: partitioning.AxesTable = ()


def build(config) -> Task:
  """Imports ``experiments.tasks.<config.task>`` and calls its ``build``."""
  name = f'experiments.tasks.{config.task}'
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name != name:
      raise  # The task exists; something it imports does not.
    raise pj.PeftError(
      f'unknown task {config.task!r} (no experiments/tasks module)'
    ) from None
  return module.build(config)


@dataclasses.dataclass(frozen=True)
class Forward:
  """``forward(weights, batch, rng=None)``: ``model.apply`` on the batch's
  ``inputs`` (in that order), dropout on where an ``rng`` is given.

  Equal and hashed by value (a Linen module is, by its fields), so the tasks
  a group builds for its seeds (``experiments.train_many``) share one
  compiled evaluation: ``adapted_outputs`` takes it as a static argument.
  """

  model: nn.Module
  inputs: tuple[str, ...]

  def __call__(self, weights: pj.Params, batch: dict, rng: jax.Array | None = None):
    return self.model.apply(
      {'params': weights},
      *(batch[name] for name in self.inputs),
      deterministic=rng is None,
      rngs=None if rng is None else {'dropout': rng},
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def adapted_outputs(
  forward: Forward,
  tree: pj.TreeAdapter,
  frozen: pj.Params,
  params: pj.AdapterParams,
  buffers: pj.Buffers,
  batch: dict,
) -> jax.Array:
  """``forward``'s deterministic outputs (e.g. logits ``(B, labels)``) on
  the adapted model, through ``peft_jax.adapted(..., factored=True)`` (so
  methods with no weight-space form and activation adapters work)."""
  return pj.adapted(tree, forward, factored=True)(frozen, params, buffers, batch)


# config.model.frozen: how the frozen weights are stored (the model computes
# in float32 either way; 'gguf' is the GGUF file's own blocks, see
# gguf_loading.load_gguf(keep_quantized=True)).
FROZEN_FORMATS = ('float32', 'bfloat16', *pj.QUANTIZATION_KINDS, 'gguf')


def stored_as(frozen: pj.Params, frozen_format: str) -> pj.Params:
  """``frozen`` (float32, or already the GGUF's blocks for ``gguf``) stored
  as ``frozen_format``: cast to bfloat16, or every kernel quantized by
  ``pj.quantize`` in groups of 64."""
  if frozen_format == 'bfloat16':
    return jax.tree.map(lambda w: w.astype(jax.numpy.bfloat16), frozen)
  if frozen_format in pj.QUANTIZATION_KINDS:
    return pj.quantize(frozen, frozen_format, group_size=64)
  return frozen


def progress(iterable, **kwargs) -> tqdm.tqdm:
  """``tqdm.tqdm(iterable, **kwargs)``, shown by process 0 only."""
  return tqdm.tqdm(iterable, disable=jax.process_index() != 0, **kwargs)


def evaluation_split(split: dict[str, np.ndarray], limit: int | None):
  """The first ``limit`` examples of ``split`` (every one when None): what
  an evaluation with ``config.data.eval_limit = limit`` runs on."""
  return {k: v[:limit] for k, v in split.items()}


def evaluation_batches(split: dict[str, np.ndarray], batch_size: int, name: str):
  """``batching.eval_batches(split, batch_size)`` under a progress bar
  named ``name``."""
  total = -(-len(split['label']) // batch_size)
  batches = batching.eval_batches(split, batch_size)
  return progress(batches, total=total, desc=f'evaluating {name}', leave=False)


def accuracies(
  correct: Callable[[dict], jax.Array],
  splits: dict[str, dict],
  batch_size: int,
  limit: int | None,
) -> dict[str, float]:
  """``{'<split>_accuracy': float, '<split>_examples': int}``: the hits
  ``correct(batch)`` summed over fixed-size batches of each split's first
  ``limit`` examples (``evaluation_batches``, whose ``weight`` marks the
  padding), over their count."""
  metrics = {}
  for name, split in splits.items():
    split = evaluation_split(split, limit)
    batches = evaluation_batches(split, batch_size, name)
    hits = sum(float(correct(b)) for b in batches)
    metrics[f'{name}_accuracy'] = hits / len(split['label'])
    metrics[f'{name}_examples'] = len(split['label'])
  return metrics
