#!/usr/bin/env bash
# The GPU check of the speed issue, prepared to fit one call of a lent GPU
# (about 9 minutes): the reference step benchmark, every setting once (HF PEFT
# eager and torch.compile beside ours, compile times in its JSON), then a
# jax.profiler trace of the factored LoRA step with its compiled HLO, kept for
# a per-op reading, then the factored step with XLA's dot merger widened
# (below). Run from the repository root:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# It writes 7 files under $OUT (default /tmp/gpu_check): log.txt,
# lora_step_SIZE.{json,md}, profile_SIZE.{json,md} and
# traces/jax_lora_factored.{perfetto_trace.json.gz,hlo.txt}. A stage that
# outlasts its time is cut short; the benchmark keeps the settings it finished.
# Rehearse it on a CPU: SIZE=smoke PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -u
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
out=${OUT:-/tmp/gpu_check}
size=${SIZE:-reference}
python=${PYTHON:-python3}
mkdir -p "$out"
log="$out/log.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$python" -c 'import jax, flax, optax; print(jax.__version__, flax.__version__,
optax.__version__, jax.devices())'
} > "$log" 2>&1
timeout "${BENCH_SECONDS:-380}" "$python" -m benchmarks.lora_step --size "$size" \
  --repeats 1 --child-timeout "${CHILD_SECONDS:-180}" \
  --torch-python "${TORCH_PYTHON:-$python}" --out "$out/lora_step_$size.json" >> "$log" 2>&1
echo "lora_step exit $? $(date -u)" >> "$log"
timeout "${TRACE_SECONDS:-100}" "$python" -m benchmarks.cpu_profile --size "$size" \
  --settings jax_lora_factored --steps 3 --keep-trace "$out/traces" \
  --out "$out/profile_$size.json" >> "$log" 2>&1
echo "profile exit $? $(date -u)" >> "$log"
# XLA's GPU DotMerger merges dots that share an operand (LoRA's x @ a of
# q/k/v, of gate/up) only below xla_gpu_dot_merger_threshold_mb, 32 by
# default; the reference step's x is 32 MiB in bfloat16, so they stay apart.
# The factored step once more with the threshold raised (its table: the log).
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_dot_merger_threshold_mb=256" \
  timeout "${MERGER_SECONDS:-80}" "$python" -m benchmarks.lora_step --size "$size" \
  --settings jax_lora_factored --out "/tmp/gpu_check_merger_$size.json" >> "$log" 2>&1
echo "merger exit $? $(date -u)" >> "$log"
