"""Tasks: a model, its data and its loss, built from a config.

Each task module has ``build(config) -> Task``; ``config.task`` names it.
"""

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import peft_jax as pj


class Task(NamedTuple):
  """What the trainer needs from a task.

  Attributes:
    frozen: the frozen parameter tree (pretrained encoder + new head).
    loss_fn: ``(params, batch, rng) -> (loss, metrics)``.
    train_batch: ``step -> batch``, deterministic in the step.
    evaluate: ``(adapter, theta) -> {metric: float}`` on the validation and
      test splits, for the tree adapter and its parameters (tasks run the
      model through ``peft_jax.factored``, so non-mergeable methods work).
    describe: one line on the model and data, for logs.
  """

  frozen: pj.Params
  loss_fn: Callable
  train_batch: Callable[[int], Any]
  evaluate: Callable[[pj.Adapter, pj.AdapterParams], dict[str, float]]
  describe: str


def build(config) -> Task:
  """Imports ``experiments.tasks.<config.task>`` and calls its ``build``."""
  try:
    module = importlib.import_module(f'experiments.tasks.{config.task}')
  except ModuleNotFoundError:
    raise pj.PeftError(
      f'unknown task {config.task!r} (no experiments/tasks module)'
    ) from None
  return module.build(config)
