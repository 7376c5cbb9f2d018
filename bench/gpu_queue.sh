#!/usr/bin/env bash
# The measurements bench/NOTES.md queues for the next GPU time, in stages that each fit one
# device call (600 s). Results land in bench/results/ (named by GPU and date) and in $OUT when
# the device tool provides it, so they come back with the call.
#
#   bash bench/gpu_queue.sh tests     # GPU tests of the features no GPU has run yet
#   bash bench/gpu_queue.sh kernels   # ring window, latent decode, flash tiles without spills
#   bash bench/gpu_queue.sh moe       # Mixtral 8x7B, GPT-OSS 20B end to end
#   bash bench/gpu_queue.sh deepseek  # DeepSeek-V2-Lite end to end (latent cache)
#   bash bench/gpu_queue.sh linear    # Qwen3.5 (gated delta-net) end to end
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[-1])")
day=$(date +%Y-%m-%d)
keep() {  # copy a result file where the device tool brings files back
    if [[ -n "${OUT:-}" ]]; then cp "$1" "$OUT/"; fi
}

case "${1:-}" in
tests)
    log="bench/results/gpu-tests-$gpu-$day-queue.txt"
    python -m pytest -q -x tests/gpu -k "moe or mixtral or gpt_oss or glm4 or host_wait or ring \
        or latent or deepseek or linear_attention or qwen35 or granite4" 2>&1 | tee "$log" | tail -30
    keep "$log"
    ;;
kernels)
    log="bench/results/kernels-$gpu-$day-queue.jsonl"
    python bench/kernels.py --only decode_window,decode_latent,flash --sweep --out "$log"
    keep "$log"
    ;;
moe)
    log="bench/results/e2e-moe-$gpu-$day.jsonl"
    python bench/e2e.py --models mixtral-8x7b:1,gpt-oss-20b:1,mixtral-8x7b:16 --prefill "" \
        --no-compile --out "$log"
    keep "$log"
    ;;
deepseek)
    log="bench/results/e2e-deepseek-$gpu-$day.jsonl"
    # The latent cache against every head's keys and values, alternating in one process.
    python bench/e2e.py --models deepseek-v2-lite:1,deepseek-v2-lite:16 --prefill "" \
        --no-compile --ab-env DSC_ABSORB_LATENT=0 --out "$log"
    keep "$log"
    ;;
linear)
    log="bench/results/e2e-linear-$gpu-$day.jsonl"
    python bench/e2e.py --models qwen3.5:1,qwen3.5:16 --prefill "" --no-compile --out "$log"
    keep "$log"
    ;;
*)
    echo "usage: bash bench/gpu_queue.sh tests|kernels|moe|deepseek|linear" >&2
    exit 2
    ;;
esac
