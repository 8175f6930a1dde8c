"""A Llama-family decoder in Flax Linen that loads Hugging Face checkpoints.

One module covers Llama 2/3 (incl. Llama 3.1 ``llama3`` RoPE scaling),
Mistral (without sliding window), Qwen2 (``q/k/v`` biases), TinyLlama and
SmolLM2: pre-RMSNorm layers, rotary position embeddings in Hugging Face's
``rotate_half`` convention, grouped-query attention
(``peft_jax.models.layers.attention``; ``jax.nn.dot_product_attention``'s
cuDNN or XLA implementation with ``attention_impl='cudnn'`` or ``'xla'``)
and a SwiGLU MLP. Every linear layer is a plain
``flax.linen.Dense``, so the factored path of peft_jax intercepts them.

Parameter names (``/``-joined key paths of the ``params`` collection), which
target rules match against; with ``scan_layers=False``::

  embed_tokens/embedding                               (vocab, d)
  layers_{i}/self_attn/q_proj/{kernel,bias}            (d, heads*hd), (heads*hd,)
  layers_{i}/self_attn/{k_proj,v_proj}/{kernel,bias}   (d, kv_heads*hd), (kv_heads*hd,)
  layers_{i}/self_attn/o_proj/{kernel,bias}            (heads*hd, d), (d,)
  layers_{i}/mlp/{gate_proj,up_proj}/kernel            (d, ffn)
  layers_{i}/mlp/down_proj/kernel                      (ffn, d)
  layers_{i}/{input_layernorm,post_attention_layernorm}/scale  (d,)
  norm/scale                                           (d,)
  lm_head/kernel                                       (d, vocab)

``q/k/v`` biases exist iff ``attention_bias``, the ``o_proj`` bias iff
``attention_out_bias``; ``lm_head`` is absent when ``tie_word_embeddings``.

With ``scan_layers=True`` the ``layers_{i}`` subtrees are replaced by one
``nn.scan`` module named ``layers`` whose leaves carry a leading
``num_layers`` axis (``layers/self_attn/q_proj/kernel: (L, d, heads*hd)``);
``stack_layers`` / ``unstack_layers`` convert between the two layouts.
Kernels use the Flax layout ``(d_in, d_out)``, the transpose of a PyTorch
``Linear.weight``.

Hook points (``peft_jax.hook_point``; names are module paths plus the point;
under ``scan_layers`` every layer is ``layers/...``)::

  input_embeddings                        (embeddings (b, s, d),
                                           attention_mask (b, s) or None)
  layers_{i}/self_attn/attention_kv       AttentionKV(k, v, None, x): k, v each
                                          (b, s, kv_heads, hd), keys after RoPE;
                                          x (b, s, d) the normalised input
  layers_{i}/self_attn/adaption_prompt    (prompt (0, d), gate ()): a zero-length
                                          placeholder; see LLaMA-Adapter below
  layers_{i}/self_attn/attention_output   (b, s, d) after o_proj (and any
                                          adaption branch), before residual
  layers_{i}/self_attn/attention_block    (x, h), each (b, s, d): x the
                                          input_layernorm output, h as above
  layers_{i}/mlp/ffn_intermediate         (b, s, ffn) silu(gate) * up
  layers_{i}/mlp/ffn_output               (b, s, d) after down_proj, before residual
  layers_{i}/mlp/ffn_block                (x, h), each (b, s, d): x the
                                          post_attention_layernorm output
                                          (gate/up's input), h as above

A ``*_block`` point is for parallel adapters: the model continues with the
``h`` the adapter returns (after any adapter at the ``*_output`` point).

Prompt tuning: an activation adapter at ``input_embeddings`` may return ``p`` more
positions at the front (and the mask with ``p`` more entries, or None). They
take RoPE positions ``0..p-1`` and the tokens are shifted by ``p`` (given
``positions`` are shifted by ``p`` and the prompts numbered ``0..p-1`` in
front of them); they are causal like tokens, and the ``p`` positions are
dropped from the returned logits (``(b, s, vocab)`` as without an adapter).

Prefix tuning: an adapter at ``attention_kv`` may return ``p`` more keys and
values at the front (``kv_heads`` heads; RoPE is not applied to them, the
queries keep their positions). Every query attends to all of them, and
causally to the tokens; ``attention_mask`` masks only the tokens. With a KV
cache the prefix is not written to the cache: it stands before the cache
slots at every step, so cached decoding and ``generate`` work with it.

Prompt tuning with a KV cache: the cache holds the tokens only. At every
call the ``p`` prompt positions are recomputed (they see only each other, so
they are the same at every step) and their keys stand before the cache
slots, like a prefix; ``attention_mask`` covers the cache slots as without a
prompt (the adapter puts ``p`` ones in front), ``end`` counts tokens, and
positions continue at ``p + end``. So cached decoding and ``generate`` work
with prompt tuning, at the cost of ``p`` more positions per decoding step.

LLaMA-Adapter (``adaption_prompt``): an adapter at ``adaption_prompt`` returns
``(P (l, d), g ())``; the attention then adds ``o_proj(g · softmax(q Kᵀ/√hd)
V)`` to its ``o_proj`` output, ``q`` the layer's queries after RoPE, ``K``,
``V`` the layer's own ``k_proj``/``v_proj`` of ``P`` (no RoPE, repeated for
grouped-query attention), the float32 softmax over the ``l`` prompt positions
only, as Hugging Face PEFT's ``AdaptedAttention`` (``model.adaption_branch``).
Sequence lengths are unchanged and the prompt keys need no cache, so it works
with the KV cache and ``generate`` (queries at the cache positions). With no
adapter the placeholder has ``l = 0`` and the branch is not computed. As in
HF, the branch's ``o_proj`` keeps its bias: with ``attention_out_bias`` that
bias is added a second time, even at gate 0.

Modules: ``model`` (config, RoPE, ``LlamaForCausalLM``,
``LlamaForSequenceClassification``: ``score`` on the last real token),
``generation`` (``init_cache``, ``generate``), ``conversion`` (``load_hf``,
``load_hf_classifier``, ``hf_layout``, ``stack_layers``); their public names
are importable from this package.

Example::

  config, params = load_hf('path/to/TinyLlama', dtype=jnp.bfloat16)
  model = LlamaForCausalLM(config)
  logits = model.apply({'params': params}, input_ids)        # (b, t, vocab)
  new_ids = generate(model, params, input_ids, max_new_tokens=32)
"""

from peft_jax.models.llama.conversion import (
  abstract_params,
  hf_layout,
  hf_modules,
  load_hf,
  load_hf_classifier,
  stack_layers,
  unstack_layers,
)
from peft_jax.models.llama.generation import generate, init_cache
from peft_jax.models.llama.model import (
  PARAM_AXES,
  ROPE_TYPES,
  RUNTIME_OPTIONS,
  LlamaAttention,
  LlamaConfig,
  LlamaDecoderLayer,
  LlamaForCausalLM,
  LlamaForSequenceClassification,
  LlamaMLP,
  RMSNorm,
  apply_rope,
  check_runtime_options,
  rope_cos_sin,
  rope_inv_freq,
)

__all__ = [
  'PARAM_AXES',
  'ROPE_TYPES',
  'RUNTIME_OPTIONS',
  'LlamaAttention',
  'LlamaConfig',
  'LlamaDecoderLayer',
  'LlamaForCausalLM',
  'LlamaForSequenceClassification',
  'LlamaMLP',
  'RMSNorm',
  'abstract_params',
  'apply_rope',
  'check_runtime_options',
  'generate',
  'hf_layout',
  'hf_modules',
  'init_cache',
  'load_hf',
  'load_hf_classifier',
  'rope_cos_sin',
  'rope_inv_freq',
  'stack_layers',
  'unstack_layers',
]
