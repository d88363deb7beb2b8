#!/usr/bin/env bash
# GPU checks that CPU CI cannot make: bf16 training under DeepSpeed ZeRO-2 and ZeRO-3 (replicated
# and ZeRO-3-sharded teacher, activation checkpointing, flash-attention when installed) on tiny
# models, then the loss and step benchmarks in bf16 at real shapes.
#
#   bash bench/gpu_check.sh            # from the repository root, with the package installed
#
# Every training run must exit 0 and write a student; the benchmarks print their ratio tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
WORK=$(mktemp -d)
GPUS=$(nvidia-smi -L | wc -l)
PROCESSES=$(( GPUS >= 2 ? 2 : 1 ))
echo "GPUs: $GPUS, processes per run: $PROCESSES, work dir: $WORK"

# Tiny Llama teacher/student pair and a text dataset, made in-process (nothing downloaded).
"$PYTHON" - "$WORK" <<'PY'
import json, random, sys
from pathlib import Path
from kd_dist.tiny import build_model, build_tokenizer, save_pair
root = Path(sys.argv[1])
rng = random.Random(0)
words = "the a cat dog bird sees likes finds river house tree moon and in park home".split()
sentences = [" ".join(rng.choices(words, k=rng.randint(4, 24))) + "." for _ in range(512)]
tokenizer = build_tokenizer(sentences, vocab_size=512, with_pad=False)
save_pair(root / "teacher", build_model("llama", tokenizer, "small"), tokenizer)
save_pair(root / "student", build_model("llama", tokenizer, "tiny"), tokenizer)
(root / "data.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
PY

run() {  # run NAME CONFIG EXTRA_FLAGS...
  local name=$1 config=$2
  shift 2
  accelerate launch --config_file "$config" --num_processes "$PROCESSES" -m kd_dist train \
    --teacher_model "$WORK/teacher" --student_model "$WORK/student" --dataset "$WORK/data.jsonl" \
    --output_dir "$WORK/$name" --bf16 --max_steps 20 --batch_size 8 --save_steps 10 "$@"
  test -f "$WORK/$name/model.safetensors"
  echo "OK: $name"
}
run zero2 accelerate_configs/deepspeed_zero2.yaml
run zero3 accelerate_configs/deepspeed_zero3.yaml --teacher_placement replicate
run zero3_teacher accelerate_configs/deepspeed_zero3.yaml --teacher_placement zero3
run zero3_resume accelerate_configs/deepspeed_zero3.yaml --teacher_placement zero3 \
  --resume_from_checkpoint "$WORK/zero3_teacher/checkpoints/step-00000010" --overwrite_output_dir
run zero3_checkpointing accelerate_configs/deepspeed_zero3.yaml --teacher_placement zero3 \
  --gradient_checkpointing --teacher_dtype bfloat16
if "$PYTHON" -c "import flash_attn" 2>/dev/null; then
  run flash_attention accelerate_configs/deepspeed_zero2.yaml --attn_implementation flash_attention_2
fi

"$PYTHON" bench/loss_bench.py --repeats 5
# Real shapes in bf16: SmolLM2-135M's shape and a 10-layer cut, then the 1.7B-shaped pair.
"$PYTHON" bench/step_bench.py --bf16 --batch 8 --seq 2048 --repeats 10
"$PYTHON" bench/step_bench.py --bf16 --pair larger --batch 4 --seq 2048 --repeats 5
