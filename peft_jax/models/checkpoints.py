"""Reading Hugging Face checkpoint files and checking converted parameter trees."""

import json
import pathlib
from typing import Any

import numpy as np
import safetensors
from flax import traverse_util

from peft_jax._src.base import PeftError


def read_safetensors(model_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of ``model.safetensors``, or of the shards of its index.

  Args:
    model_dir: a Hugging Face checkpoint directory.

  Returns:
    ``{torch tensor name: numpy array}``.

  Raises:
    PeftError: if neither file is there, or a listed shard is missing.
  """
  model_dir = pathlib.Path(model_dir)
  single = model_dir / 'model.safetensors'
  index = model_dir / 'model.safetensors.index.json'
  if single.is_file():
    files = [single]
  elif index.is_file():
    weight_map = json.loads(index.read_text())['weight_map']
    files = [model_dir / f for f in sorted(set(weight_map.values()))]
    for f in files:
      if not f.is_file():
        raise PeftError(f'Shard {f.name!r} listed in {index} does not exist.')
  else:
    raise PeftError(
      f'No model.safetensors or model.safetensors.index.json in '
      f'{str(model_dir)!r}; only safetensors checkpoints are supported.'
    )
  tensors = {}
  for f in files:
    with safetensors.safe_open(f, framework='numpy') as shard:
      for name in shard.keys():  # noqa: SIM118 (safe_open is not a dict)
        tensors[name] = shard.get_tensor(name)
  return tensors


def check_param_shapes(params: Any, abstract: Any) -> None:
  """Raises naming the first leaf whose shape differs from the model's.

  Args:
    params: a converted ``params`` tree.
    abstract: the model's parameter shapes (e.g. ``jax.eval_shape`` of init).

  Raises:
    PeftError: naming the leaf and both shapes (None: absent).
  """
  want = traverse_util.flatten_dict(abstract, sep='/')
  got = traverse_util.flatten_dict(params, sep='/')
  for name in sorted(want.keys() | got.keys()):
    want_shape = tuple(want[name].shape) if name in want else None
    got_shape = tuple(got[name].shape) if name in got else None
    if want_shape != got_shape:
      raise PeftError(
        f'Parameter {name!r} has shape {got_shape} but the model expects '
        f'{want_shape} (None: absent); the config and the weights disagree.'
      )
