"""Tasks: a model, its data and its loss, built from a config.

Each task module has ``build(config) -> Task``; ``config.task`` names it.
"""

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

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
      the validation and test splits, for the tree adapter and its
      parameters over ``frozen`` (the task's, or a copy placed on a mesh)
      (tasks run the model through ``peft_jax.adapted(..., factored=True)``,
      so non-mergeable and activation-side methods work).
    describe: one line on the model and data, for logs.
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


def accuracies(
  correct: Callable[[dict], jax.Array], splits: dict[str, dict], batch_size: int
) -> dict[str, float]:
  """``{'<split>_accuracy': float}``: the hits ``correct(batch)`` summed over
  fixed-size batches of each split (``batching.eval_batches``, whose
  ``weight`` marks the padding), over the split's size."""
  metrics = {}
  for name, split in splits.items():
    hits = sum(float(correct(b)) for b in batching.eval_batches(split, batch_size))
    metrics[f'{name}_accuracy'] = hits / len(split['label'])
  return metrics
