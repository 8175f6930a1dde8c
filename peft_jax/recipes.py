"""The guide's hybrid methods as rules: MAM and UniPELT.

A hybrid is several methods at once, so it is a list of rules for
``by_rules``, not one method: the parts keep their own parameters, and one
θ, one optimizer, one checkpoint and one ``describe`` table hold them all.
The patterns fit every shipped model (BERT/RoBERTa, DeBERTa-v2/v3, the
Llama decoder): their query/value kernels and their hook points.
"""

from peft_jax._src.rules import Rule

# The query and value kernels of BERT (query, value), DeBERTa (query_proj,
# value_proj) and Llama (q_proj, v_proj).
QUERY_VALUE = '.*/(query|value|query_proj|value_proj|q_proj|v_proj)/kernel'


def mam(
  prefix_length: int = 30,
  bottleneck: int = 800,
  rank: int | None = 512,
  scale: float = 4.0,
) -> list[Rule]:
  """He et al.'s MAM adapter: prefix tuning in attention plus a scaled
  parallel adapter beside the FFN (the guide's §3.3).

  ``prefix_tuning(length=prefix_length, bottleneck=bottleneck)`` at every
  ``attention_kv`` (the reparametrisation MLP shared by all layers) and
  ``scaled_parallel(rank=rank, scale=scale)`` at every ``ffn_block``:
  ``h' = FFN(x) + s·ReLU(x W_d + b_d) W_u`` with ``x`` the FFN's input.
  Defaults are the paper's for XSum/MT (l = 30, MLP 800, r = 512, s = 4);
  its GLUE script uses ``mam(16, 800, 16, 2.0)`` on RoBERTa-base.
  ``rank=None`` sizes the adapter from the model, ``r = d // 2`` (the
  adapters library's ``MAMConfig``).

  Returns:
    The rules, for ``by_rules`` or ``describe``.
  """
  return [
    (
      '.*/attention_kv',
      f'prefix_tuning(length={prefix_length}, bottleneck={bottleneck})',
    ),
    ('.*/ffn_block', f'scaled_parallel(rank={rank}, scale={scale})'),
  ]


def unipelt(
  lora_rank: int = 8,
  prefix_length: int = 10,
  bottleneck: int = 512,
  reduction_factor: int = 16,
) -> list[Rule]:
  """Mao et al.'s UniPELT: gated LoRA on the query and value kernels, a gated
  prefix and a gated sequential adapter after the FFN.

  Each part is scaled by its own gate ``g = mean_s σ(x W_g + b_g)`` of its
  own input: ``gated_lora(rank=lora_rank)`` (the projection's input),
  ``prefix_tuning(length=prefix_length, bottleneck=bottleneck, gated=True)``
  (the attention's input) and ``pfeiffer(reduction_factor=reduction_factor,
  gated=True)`` at ``ffn_output`` (the FFN's output). Defaults are the
  adapters library's ``UniPELTConfig`` (LoRA r = 8, prefix l = 10 through
  its 512-wide MLP, ``seq_bn`` with reduction 16).

  Returns:
    The rules, for ``by_rules`` or ``describe``.
  """
  return [
    (QUERY_VALUE, f'gated_lora(rank={lora_rank})'),
    (
      '.*/attention_kv',
      f'prefix_tuning(length={prefix_length}, bottleneck={bottleneck}, gated=True)',
    ),
    ('.*/ffn_output', f'pfeiffer(reduction_factor={reduction_factor}, gated=True)'),
  ]
