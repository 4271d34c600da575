#!/usr/bin/env bash
# What the README still lacks from an accelerator, in one call (< 8 minutes on one
# H200): writes CSVs (and Markdown tables) under OUT_DIR.
#
#   1. population_scaling/: particle inner-steps per second against population on the
#      digits MLP population (configs/experiment/population_scaling.yaml), up to
#      saturation (or until a population does not fit);
#   2. bench_step/: one hierarchical_velo update against Adam at 100M parameters;
#   3. velo_es/: the VeLO-size PES iteration, full rank against low rank and the
#      one-theta floor, 10-d quadratic, P = 16 and 64 (analysis/bench_velo_es.py;
#      on an H200, P = 16 took 192 s, nearly all of it compiling the three variants
#      even with XLA's GPU autotuning off, so P = 256 and digits don't fit).
#
# On an H200 the first two parts took about 160 s and the third, run alone with these
# settings, 216 s; the results are in analysis/results/device_check/h200/. There
# the project's dependencies that the machine lacks (evosax, dotmap, hydra-core, omegaconf, antlr4-python3-runtime,
# tensorboardX) were carried as wheels in .whl/ and the command was
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site bash analysis/device_check.sh /tmp/dc;
#   tar czf $OUT/device_check.tgz -C /tmp dc
# (one archive: the parts write more files than some machines hand back).
#
# Usage: analysis/device_check.sh [OUT_DIR]   (default: $OUT, else
#        analysis/results/device_check). Each part has its own time limit, and the
#        scripts write their CSVs row by row, so a part cut short keeps its rows.
# DEVICE_CHECK_QUICK=1: tiny settings, to prove the script on a CPU (a few minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-analysis/results/device_check}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "${DEVICE_CHECK_QUICK:-0}" = 1 ]; then
  limits=(240 120 240)
  scaling=(--max-population 8 --devices 1 -- system.horizon=2 scaling.repeats=1)
  step=(--sizes 10k --lopts hierarchical --repeats 2 --budget 1 --no-compile)
  velo=(--lopt hierarchical --populations 4 --families quadratic --rounds 2)
else
  limits=(150 60 260)
  scaling=(--devices 1 -- "scaling.population_sizes=[64,256,1024,4096,16384,65536]")
  step=(--sizes 100M --lopts hierarchical_velo --repeats 10 --budget 10 --no-compile)
  velo=(--populations 16,64 --families quadratic --rounds 3 --budget-s 5)
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python -c "import jax; print(jax.__version__, jax.devices())"
} >"$out/device.txt" 2>&1

status=0
run() {  # run LIMIT NAME COMMAND...: one part, its log beside its CSVs
  local limit=$1 name=$2
  shift 2
  mkdir -p "$out/$name"
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@" >"$out/$name/log.txt" 2>&1 || {
    echo "   $name stopped with status $? (see $out/$name/log.txt)"
    status=1
  }
  tail -n 12 "$out/$name/log.txt"
}

run "${limits[0]}" population_scaling \
  python analysis/population_scaling.py --out "$out/population_scaling" "${scaling[@]}"
run "${limits[1]}" bench_step \
  python analysis/bench_step.py --out "$out/bench_step" "${step[@]}"
# XLA's GPU autotuning only lengthens these compiles (a CPU ignores the flag)
run "${limits[2]}" velo_es env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
  python analysis/bench_velo_es.py --out "$out/velo_es" "${velo[@]}"
exit "$status"
