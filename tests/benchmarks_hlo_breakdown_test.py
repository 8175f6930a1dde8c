"""The HLO breakdown: its parser on hand-written HLO, and the script end to end."""

import json
import math

from benchmarks import hlo_breakdown as hb
from benchmarks import lora_step
from peft_jax.models import layers as layers_module

# A step in miniature: an adapter dot fused with the convert of its input, an
# LM-head dot, a batched (attention) dot, a kernel convert, a transpose, an
# elementwise op, a reduce fusion, and a while loop (3 trips, read from its
# condition) holding a projection dot and an in-place dynamic-update-slice.
MODULE = """\
HloModule jit_step, is_scheduled=true

%fused_adapter (p0: bf16[8,32], p1: f32[32,16]) -> f32[8,16] {
  %p0 = bf16[8,32]{1,0} parameter(0)
  %c0 = f32[8,32]{1,0} convert(%p0)
  %p1 = f32[32,16]{1,0} parameter(1)
  ROOT %d0 = f32[8,16]{1,0} dot(%c0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_kernel_convert (p0.1: bf16[32,32]) -> f32[32,32] {
  %p0.1 = bf16[32,32]{1,0} parameter(0)
  ROOT %c1 = f32[32,32]{1,0} convert(%p0.1)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_reduce (p0.2: f32[8,32]) -> f32[8] {
  %p0.2 = f32[8,32]{1,0} parameter(0)
  %sq = f32[8,32]{1,0} multiply(%p0.2, %p0.2)
  %zero = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(%sq, %zero), dimensions={1}, to_apply=%add
}

%fused_dus (p0.3: f32[3,8,32], p1.3: f32[8,32], p2.3: s32[]) -> f32[3,8,32] {
  %p0.3 = f32[3,8,32]{2,1,0} parameter(0)
  %p1.3 = f32[8,32]{1,0} parameter(1)
  %u = f32[1,8,32]{2,1,0} bitcast(%p1.3)
  %p2.3 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[3,8,32]{2,1,0} dynamic-update-slice(%p0.3, %u, %p2.3, %z, %z)
}

%body (t: (s32[], f32[8,32], f32[32,32], f32[3,8,32])) -> (s32[], f32[8,32], f32[32,32], f32[3,8,32]) {
  %t = (s32[], f32[8,32]{1,0}, f32[32,32]{1,0}, /*index=3*/f32[3,8,32]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8,32]{1,0} get-tuple-element(%t), index=1
  %w = f32[32,32]{1,0} get-tuple-element(%t), index=2
  %stack = f32[3,8,32]{2,1,0} get-tuple-element(%t), index=3
  %y = f32[8,32]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/transpose(jvp())/while/body/dot_general"}
  %saved = f32[3,8,32]{2,1,0} fusion(%stack, %y, %i), kind=kLoop, calls=%fused_dus
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one), metadata={op_name="jit(step)/transpose(jvp())/while/body/add"}
  ROOT %out = (s32[], f32[8,32]{1,0}, f32[32,32]{1,0}, f32[3,8,32]{2,1,0}) tuple(%next, %y, %w, %saved)
}

%cond (t.1: (s32[], f32[8,32], f32[32,32], f32[3,8,32])) -> pred[] {
  %t.1 = (s32[], f32[8,32]{1,0}, f32[32,32]{1,0}, f32[3,8,32]{2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (x: bf16[8,32], a: f32[32,16], head: f32[32,100], q: f32[2,4,8,6], k: bf16[32,32], stack: f32[3,8,32]) -> f32[8,16] {
  %x.2 = bf16[8,32]{1,0} parameter(0)
  %a.2 = f32[32,16]{1,0} parameter(1)
  %head = f32[32,100]{1,0} parameter(2)
  %q = f32[2,4,8,6]{3,2,1,0} parameter(3)
  %k = bf16[32,32]{1,0} parameter(4)
  %stack.2 = f32[3,8,32]{2,1,0} parameter(5)
  %xa = f32[8,16]{1,0} fusion(%x.2, %a.2), kind=kOutput, calls=%fused_adapter, metadata={op_name="jit(step)/jvp()/dot_general"}
  %kf = f32[32,32]{1,0} fusion(%k), kind=kLoop, calls=%fused_kernel_convert
  %xf = f32[8,32]{1,0} convert(%x.2), metadata={op_name="jit(step)/jvp()/convert_element_type"}
  %logits = f32[8,100]{1,0} dot(%xf, %head), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp()/dot_general"}
  %scores = f32[2,4,8,8]{3,2,1,0} dot(%q, %q), lhs_batch_dims={0,1}, lhs_contracting_dims={3}, rhs_batch_dims={0,1}, rhs_contracting_dims={3}, metadata={op_name="jit(step)/jvp()/dot_general"}
  %xt = f32[32,8]{1,0} transpose(%xf), dimensions={1,0}
  %sq = f32[8,32]{1,0} multiply(%xf, %xf), metadata={op_name="jit(step)/mul"}
  %norm = f32[8]{0} fusion(%sq), kind=kLoop, calls=%fused_reduce
  %zero.2 = s32[] constant(0)
  %init = (s32[], f32[8,32]{1,0}, f32[32,32]{1,0}, f32[3,8,32]{2,1,0}) tuple(%zero.2, %xf, %kf, %stack.2)
  %loop = (s32[], f32[8,32]{1,0}, f32[32,32]{1,0}, f32[3,8,32]{2,1,0}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(step)/transpose(jvp())/while"}
  ROOT %result = f32[8,16]{1,0} copy(%xa)
}
"""  # noqa: E501
DIMS = hb.Dims(rank=16, vocab=100, seq=8, scores=2 * 4 * 8 * 8, kernels={(32, 32)})


def test_instruction_line_with_a_tuple_shape_and_typed_operands():
  op = hb.parse_instruction(
    '  ROOT %w.1 = (s32[], bf16[2,128]{1,0}) while(( s32[], bf16[2,128]{1,0}) %t), '
    'condition=%c, body=%b, metadata={op_name="jit(step)/jvp()/while"}, '
    'backend_config={"known_trip_count":{"n":"22"}}'
  )
  assert op.is_root and op.name == 'w.1' and op.opcode == 'while'
  assert op.arrays == (hb.Array('s32', ()), hb.Array('bf16', (2, 128)))
  assert op.operands == ('t',)
  assert op.called('body') == ['b'] and op.op_name == 'jit(step)/jvp()/while'
  assert hb.trip_count(None, op) == 22
  unoptimized = hb.parse_instruction(
    '  dot.3 = f32[4,2]{1,0} dot(Arg_0.1, convert.2), lhs_contracting_dims={1}'
  )
  assert unoptimized.operands == ('Arg_0.1', 'convert.2')
  assert unoptimized.dims('lhs_contracting_dims') == (1,)
  assert unoptimized.dims('lhs_batch_dims') == ()


def test_module_computations_and_what_runs():
  module = hb.parse_module(MODULE)
  assert module.entry.name == 'main'
  assert module.fused(module.by_name['xa']).root.name == 'd0'
  assert hb.trip_count(module, module.by_name['loop']) == 3
  runs = {r.op.name: (r.times, r.phase) for r in hb.executed(module)}
  assert runs['y'] == runs['saved'] == runs['next'] == (3, 'backward')
  assert runs['xa'] == (1, 'forward') and runs['sq'] == (1, 'optimizer')
  assert runs['kf'] == (1, 'other')
  assert 'loop' not in runs and 'init' not in runs and 'lt' in runs


def test_dot_flops_and_kinds():
  module = hb.parse_module(MODULE)
  expected = {  # 2 · M · N · K by hand, and the kind.
    'd0': (2 * 8 * 16 * 32, 'adapter'),
    'logits': (2 * 8 * 100 * 32, 'lm_head'),
    'scores': (2 * (2 * 4 * 8 * 8) * 6, 'attention'),
    'y': (2 * 8 * 32 * 32, 'projection'),
  }
  for name, (flops, kind) in expected.items():
    op = module.by_name[name]
    assert hb.dot_flops(module, op) == flops, name
    assert hb.dot_kind(module, op, DIMS) == kind, name


def test_convolution_flops():
  text = """\
ENTRY %main (x: f32[1,10,10,3], k: f32[3,3,3,16]) -> f32[1,8,8,16] {
  %x = f32[1,10,10,3]{3,2,1,0} parameter(0)
  %k = f32[3,3,3,16]{3,2,1,0} parameter(1)
  ROOT %c = f32[1,8,8,16]{3,2,1,0} convolution(%x, %k), window={size=3x3}, dim_labels=b01f_01io->b01f
}
"""  # noqa: E501
  module = hb.parse_module(text)
  # Each of the 1·8·8·16 outputs sums 3·3·3 products.
  assert hb.dot_flops(module, module.by_name['c']) == 2 * (8 * 8 * 16) * 27


def test_scores_include_both_halves_of_the_causal_split():
  # DIMS: batch 2, heads 4, seq 8. layers.attention's causal split: the first
  # 4 queries of each head against 4 keys, the last 4 against all 8, with the
  # 4 heads (1 key/value head) as rows: (2, 1, 16, 4) and (2, 1, 16, 8).
  assert DIMS.is_scores(hb.Array('f32', (2, 4, 8, 8)))  # one whole block
  assert DIMS.is_scores(hb.Array('f32', (2, 1, 16, 8)))  # the late half
  assert DIMS.is_scores(hb.Array('f32', (2, 1, 16, 4)))  # the early half
  assert DIMS.is_scores(hb.Array('bf16', (3, 2, 1, 16, 4)))  # stacked layers
  assert not DIMS.is_scores(hb.Array('f32', (2, 8, 4)))  # too small
  assert not DIMS.is_scores(hb.Array('f32', (2, 4, 8, 16)))  # last dim not seq
  assert not DIMS.is_scores(hb.Array('f32', (2, 3, 8)))


def test_categories_and_bytes():
  module = hb.parse_module(MODULE)
  expected = {
    'xa': ('dot', 8 * 32 * 2 + 32 * 16 * 4 + 8 * 16 * 4),
    'kf': ('convert', 32 * 32 * (2 + 4)),
    'xf': ('convert', 8 * 32 * (2 + 4)),
    'xt': ('layout', 2 * 8 * 32 * 4),
    'sq': ('elementwise', 3 * 8 * 32 * 4),
    'norm': ('reduction', 8 * 32 * 4 + 8 * 4),
    # In place: the update (read, then written) and the index, not the stack.
    'saved': ('slice/gather', 2 * 8 * 32 * 4 + 4),
    'result': ('layout', 2 * 8 * 16 * 4),
  }
  for name, (category, size) in expected.items():
    op = module.by_name[name]
    assert hb.category(module, op) == category, name
    assert hb.op_bytes(module, op) == size, name


def test_a_converted_update_buffer_is_rewritten_whole():
  text = """\
%fused (p0: bf16[3,8], p1: bf16[8], p2: s32[]) -> bf16[3,8] {
  %p0 = bf16[3,8]{1,0} parameter(0)
  %wide = f32[3,8]{1,0} convert(%p0)
  %p1 = bf16[8]{0} parameter(1)
  %row = f32[1,8]{1,0} convert(%p1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  %dus = f32[3,8]{1,0} dynamic-update-slice(%wide, %row, %p2, %z)
  ROOT %narrow = bf16[3,8]{1,0} convert(%dus)
}

ENTRY %main (stack: bf16[3,8], x: bf16[8], i: s32[]) -> bf16[3,8] {
  %stack = bf16[3,8]{1,0} parameter(0)
  %x = bf16[8]{0} parameter(1)
  %i = s32[] parameter(2)
  ROOT %saved = bf16[3,8]{1,0} fusion(%stack, %x, %i), kind=kLoop, calls=%fused
}
"""
  module = hb.parse_module(text)
  saved = module.by_name['saved']
  assert hb.rewrites_buffer(module, saved)
  in_place = hb.parse_module(MODULE)
  assert not hb.rewrites_buffer(in_place, in_place.by_name['saved'])
  assert hb.category(module, saved) == 'convert'
  assert hb.op_bytes(module, saved) == 2 * 3 * 8 * 2 + 8 * 2 + 4  # Whole stack.
  result = hb.breakdown(text, DIMS)
  assert result['rewritten'] == {'ops': 1, 'runs': 1, 'bytes': 2 * 48 + 16 + 4}


def test_breakdown_totals():
  result = hb.breakdown(MODULE, DIMS)
  categories = result['categories']
  assert categories['dot:projection']['runs'] == 3
  assert categories['dot:projection']['flops'] == 3 * 2 * 8 * 32 * 32
  assert categories['dot:projection']['by_phase']['backward']['flops'] == (
    3 * 2 * 8 * 32 * 32
  )
  assert categories['dot:adapter']['by_phase']['forward']['flops'] == 2 * 8 * 16 * 32
  assert (
    categories['dot:attention']['scores_bytes'] == categories['dot:attention']['bytes']
  )  # Its result is the scores.
  assert categories['slice/gather']['bytes'] == 3 * (2 * 8 * 32 * 4 + 4)
  dots_once = 2 * 8 * (16 + 100 + 32) * 32 + 2 * (2 * 4 * 8 * 8) * 6
  assert result['dot_flops_once'] == dots_once
  assert result['dot_flops'] == dots_once + 2 * 2 * 8 * 32 * 32
  # One per result element: the activation convert, the multiply, the
  # reduce fusion's multiply and reduce, the loop's add and compare (scalars,
  # counted once), the kernel convert.
  assert result['other_flops_once'] == 3 * 8 * 32 + 8 + 2 + 32 * 32
  assert result['converts']['bf16->f32 kernel'] == {
    'written': {'runs': 1, 'bytes': 32 * 32 * 4}
  }
  assert result['converts']['bf16->f32 activation'] == {
    'written': {'runs': 1, 'bytes': 8 * 32 * 4},
    'fused': {'runs': 1, 'bytes': 8 * 32 * 4},
  }
  assert result['rewritten'] == {'ops': 0, 'runs': 0, 'bytes': 0}
  assert result['largest'][0]['op'] == 'y'  # 3 · (8·32 + 32·32 + 8·32) · 4 bytes.


def test_smoke_step_end_to_end(tmp_path):
  out = tmp_path / 'hlo.json'
  out.with_suffix('.md').write_text('# Reading\n\nBy hand.\n\n## Generated: old\n')
  settings = 'jax_full,jax_lora_factored'
  hb.main(['--size', 'smoke', '--settings', settings, '--out', str(out)])
  report = json.loads(out.read_text())
  full, lora = report['rows']
  shape = lora_step.Shape(**lora_step.SIZES['smoke'])
  tokens, d = shape.batch * shape.seq, shape.hidden_size
  head = d * shape.vocab_size
  layers = shape.matmul_params - head
  # q·kᵀ and p·v, 2·batch·heads·seq²·head_dim each: forward, and twice that
  # backward (layers.attention's recomputed q·kᵀ is the forward's: XLA keeps
  # it). Causal self-attention of 128 tokens is two halves of the queries,
  # the first against half the keys: 3/4 of the seq² pairs.
  assert shape.seq == layers_module._SPLIT_FROM
  pairs = shape.seq**2 * 3 // 4
  attention = 3 * 2 * 2 * shape.batch * pairs * d * shape.num_layers
  kv = d // shape.num_heads * shape.num_kv_heads
  in_out = 4 * d + 2 * (d + kv) + 3 * (d + shape.intermediate_size)
  adapter = 6 * tokens * lora_step.RANK * in_out * shape.num_layers
  # LoRA keeps the embedding frozen, so nothing reads the input gradient of
  # the first layer's q/k/v; with the layers unrolled XLA never computes it:
  # 2·tokens·d·(d + 2·kv) through the kernels, 2·tokens·r·d through each
  # adapter's a.
  assert not shape.scan_layers
  unread = {
    'dot:projection': 2 * tokens * d * (d + 2 * kv),
    'dot:adapter': 3 * 2 * tokens * lora_step.RANK * d,
  }
  lora_flops = {'dot:adapter': adapter - unread['dot:adapter']}
  for row, n, extra in ((full, 6, {}), (lora, 4, lora_flops)):
    flops = {k: v['flops'] for k, v in row['categories'].items() if k[:4] == 'dot:'}
    unread_projection = unread['dot:projection'] if row is lora else 0
    assert flops == {
      'dot:projection': n * tokens * layers - unread_projection,
      'dot:lm_head': n * tokens * head,
      'dot:attention': attention,
      **extra,
    }, row['setting']
    # Before optimization the backward's q·kᵀ is its own dot (1 of the 6).
    assert row['program_dot_flops'] == row['dot_flops'] + attention // 6
    # XLA counts loop bodies once; so do the `_once` totals.
    counted = row['dot_flops_once'] + row['other_flops_once']
    assert math.isclose(counted, row['xla_flops'], rel_tol=0.02), row['setting']
    assert 0.85 * row['xla_flops'] < row['dot_flops_once'] <= row['xla_flops']
    assert 'collective' not in row['categories']
  # memory_analysis: full fine-tuning's arguments hold float32 master weights
  # and AdamW's two moments, 12 bytes a parameter; LoRA's hold the bf16 frozen
  # weights and small factors.
  assert full['argument_bytes'] >= 12 * shape.matmul_params
  assert 2 * shape.matmul_params <= lora['argument_bytes'] < full['argument_bytes'] / 3
  assert lora['temp_bytes'] > 0
  markdown = out.with_suffix('.md').read_text()
  assert 'GiB of temporaries' in markdown
  assert markdown.startswith('# Reading\n\nBy hand.\n\n## Generated: cpu')
  assert 'Generated: old' not in markdown
  assert '### jax_lora_factored' in markdown and '| dot:adapter |' in markdown


def test_compile_ratios_and_their_table():
  sample = lambda wall, cpu: {'wall_s': wall, 'cpu_s': cpu, 'load_1min': 1.0}
  timing = {
    'jax_lora_weight': [sample(10, 20), sample(20, 22), sample(12, 24)],
    'jax_lora_factored': [sample(11, 24), sample(30, 26), sample(12, 30)],
  }
  timing = {
    k: {
      'median_wall_s': sorted(x['wall_s'] for x in v)[1],
      'median_cpu_s': sorted(x['cpu_s'] for x in v)[1],
      'samples': v,
    }
    for k, v in timing.items()
  }
  ratios = hb.compile_ratios(timing, 'jax_lora_factored', 'jax_lora_weight')
  assert ratios == {'wall': 12 / 12, 'cpu': 26 / 22, 'wall_per_round': 1.1}
  lines = hb.compile_section(timing)
  assert '**1.18× in CPU seconds**' in lines[2]
  assert lines[-2].startswith('| jax_lora_factored | 12.0 | 26.0 | 11.0 / 24.0 (1.0)')


def test_float32_step_and_its_compile_times_in_child_processes(tmp_path):
  out = tmp_path / 'hlo.json'
  settings = 'jax_lora_factored'
  argv = ['--size', 'smoke', '--dtype', 'float32', '--settings', settings]
  hb.main([*argv, '--compile-repeats', '1', '--out', str(out)])
  report = json.loads(out.read_text())
  assert report['dtype'] == 'float32'
  (row,) = report['rows']
  # No bfloat16 anywhere: the program asks for no conversion from or to it.
  assert not [k for k in row['program_converts'] if 'bf16' in k]
  (sample,) = report['compile']['jax_lora_factored']['samples']
  assert sample['wall_s'] > 0 and sample['cpu_s'] > 0
