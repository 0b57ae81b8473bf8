#!/usr/bin/env bash
# End-to-end on the embedded defaults (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) and the example
# domain: build it, measure retrieval, train one epoch, then evaluate the four systems
# (prompt, rag, sft, sft+rag) on the whole held-out test split through the vLLM engine.
# Slow on a 2-core CPU (tens of minutes): it is `make e2e`, not part of `make test`.
#
#   bash bench/e2e_embedded.sh [WORKSPACE]      (default: ./workspace-e2e; log lines are timestamped)
set -euo pipefail
cd "$(dirname "$0")/.."
export SFT_STUDIO_HOME="${1:-$PWD/workspace-e2e}"
export SFT_STUDIO_MODEL_CACHE="${SFT_STUDIO_MODEL_CACHE:-$PWD/.cache/models}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CLI=.venv/bin/sft-studio
RUN="${E2E_RUN:-pydocs-epoch1}"
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
t0=$(date +%s)

stamp "example domain -> $SFT_STUDIO_HOME"
$CLI example build
stamp "retrieval quality (test and test_seen splits)"
$CLI kb eval pydocs --dataset pydocs
$CLI kb eval pydocs --dataset pydocs --split test_seen || true

if [ "$($CLI runs show "$RUN" 2>/dev/null | grep -c '"succeeded"')" = 0 ]; then
  stamp "train one epoch: run $RUN"
  t=$(date +%s)
  $CLI train --dataset pydocs --epochs 1 --run-name "$RUN"
  echo "train wall time: $(( $(date +%s) - t )) s"
fi
stamp "four-system eval on the held-out test split"
t=$(date +%s)
$CLI eval --dataset pydocs --kb pydocs --systems "prompt,rag,sft:$RUN,sft+rag:$RUN"
echo "eval wall time: $(( $(date +%s) - t )) s"
stamp "done in $(( $(date +%s) - t0 )) s"
