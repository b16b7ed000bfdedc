#!/usr/bin/env bash
# One command for whoever has a GPU: from a clean tree, build the extension,
# run the whole test suite with CUDA, run the CUDA op tests under
# compute-sanitizer (memcheck and racecheck), run the full CUDA benchmark
# and the end-to-end model benchmarks (inference at batch 1 and 8, a
# training step), and leave every log and result in OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Uses the python3 that holds a CUDA build of torch (or $PYTHON), with
# pytest, hypothesis, expecttest, tqdm and matplotlib installed. Honours
# TORCH_CUDA_ARCH_LIST (default 9.0) and MAX_JOBS (default 16). Exits non-zero
# if any step failed; each step's output is in OUTDIR/<step>.log.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
failed=0

step() {
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s), see $OUT/$name.log"
    tail -n 20 "$OUT/$name.log"
    failed=1
  fi
}

{
  nvidia-smi || true
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
  echo "commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

step build "$PY" -m pip install --no-build-isolation --no-deps -v -e .
"$PY" -c "import maskrcnn_ops, sys; info = maskrcnn_ops.build_info(); print(info); sys.exit(0 if info['with_cuda'] else 1)" \
  || { echo "the extension was built without CUDA kernels"; exit 1; }
step tests "$PY" -m pytest -q -rs tests
# The sanitizers slow kernels down a hundredfold: CUDA cases only, without
# the compile tests and the 200k/400k-box cases.
CUDA_TESTS=(tests/test_roi_align.py tests/test_roi_align_max.py tests/test_multiscale_roi_align.py tests/test_nms.py
  tests/test_boxes.py tests/test_anchors.py tests/test_proposals.py)
step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 \
  "$PY" -m pytest -q -x -m "cuda and not slow" -k "not compile" "${CUDA_TESTS[@]}"
step racecheck compute-sanitizer --tool racecheck --error-exitcode 1 \
  "$PY" -m pytest -q -x -m "cuda and not slow" -k "not compile" "${CUDA_TESTS[@]}"
step benchmark "$PY" -m benchmarks --device cuda --out "$OUT/benchmarks"
# End to end, same weights, ours against torchvision's maskrcnn_resnet50_fpn.
for batch in 1 8; do
  step "model_batch$batch" "$PY" -m benchmarks.model --device cuda --batch "$batch" \
    --json "$OUT/model_batch$batch.json" --markdown "$OUT/model_batch$batch.md"
done
step model_train "$PY" -m benchmarks.model --device cuda --train --batch 2 \
  --json "$OUT/model_train.json" --markdown "$OUT/model_train.md"
exit $failed
