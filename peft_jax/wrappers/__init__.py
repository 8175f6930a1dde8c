"""Wrappers: take a method, return a modified one; they compose in any order.

* ``stacked(method)``: one copy per layer of a kernel stacked for a scan.
* ``matrix_view(method, n_in)``: a matrix method on an N-D kernel.
* ``mpc(method, kind, gamma, form)``: a matrix pattern constraint on its
  low-rank factors.
* ``rank_masked(method)``: a rank-``R`` LoRA that acts as rank ``r ≤ R``
  (``with_rank``, ``pad_rank``), so adapters of different ranks stack.

Each forwards every capability it does not change (``Adapter._replace``) and
transforms whole the ones it does (``linear``, ``regularizer``), so
``mpc(stacked(m))`` and ``stacked(mpc(m))`` are the same adapter, and so are
``matrix_view(stacked(m))`` and ``stacked(matrix_view(m))``. Registered in
their own namespace (``peft_jax.wrapper_names()``); spec strings nest:
``"stacked('lora(rank=4)')"``.
"""

from peft_jax.wrappers.matrix_view import matrix_view as matrix_view
from peft_jax.wrappers.mpc import mpc as mpc
from peft_jax.wrappers.rank_masked import pad_rank as pad_rank
from peft_jax.wrappers.rank_masked import rank_masked as rank_masked
from peft_jax.wrappers.rank_masked import with_rank as with_rank
from peft_jax.wrappers.stacked import stacked as stacked
