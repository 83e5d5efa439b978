#!/usr/bin/env bash
# The GPU measurements of README "Speed" in one short run (a few minutes on one H200):
# STDiT3-XL/2 at 480p / 51 frames, bf16, CFG batch 2, 30 steps, random weights; uncached and
# DuCa, eager and compiled, with the profile of one full step. Needs a CUDA build of torch in
# ${PYTHON:-python} (this project's .venv pins the CPU wheel). Results: JSON and logs in
# ${OUT:-gpu_results}/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${OUT:-gpu_results}
REPEAT=${REPEAT:-2}
mkdir -p "$DEST"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script measures a GPU')"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$DEST/device.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" tools/benchmark.py --preset opensora-480p-51f --device cuda --policies none,DuCa \
    --profile --repeat "$REPEAT" --json "$DEST/xl480_eager.json" 2>&1 | tee "$DEST/xl480_eager.log"
"$PY" tools/benchmark.py --preset opensora-480p-51f --device cuda --policies none,DuCa \
    --compile --repeat "$REPEAT" --json "$DEST/xl480_compiled.json" 2>&1 | tee "$DEST/xl480_compiled.log"
# Open-Sora 2.0's published MMDiT (random weights, bf16) at 256px: FORA / TrunkReuse / TeaCache /
# DuCa against uncached (11.9B parameters: about 24 GB of weights in bf16)
"$PY" tools/benchmark.py --preset opensora2-256px --device cuda --steps 10 \
    --policies none,DuCa,FORA,TeaCache --repeat 1 --json "$DEST/os2_256px.json" 2>&1 | \
    tee "$DEST/os2_256px.log"
