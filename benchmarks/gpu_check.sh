#!/usr/bin/env bash
# The GPU checks of issues 10, 12 and 15, as one script for the `device` tool (one H100/H200, torch
# 2.11 preinstalled, no internet). Not run yet: no GPU was lent to the session that wrote it.
#
# Before the call, on the CPU machine, put the current stack's other wheels in .whl/ (git-ignored):
#   echo /.whl/ >> .git/info/exclude
#   grep -vE '^(#|torch==|torchaudio==|nvidia-|triton==)' requirements-current.lock > /tmp/wheels.txt
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl -r /tmp/wheels.txt
# Then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540).
# Figures land in $OUT (bench JSON/markdown, logs); the log says which card and torch version.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
EKD="python3 -m s3prl_ekd.cli"
WORK=/tmp/ekd && mkdir -p $WORK && cd $WORK

# 1. live and cached step, paper's batch (24 x 15.6 s), K = 1 and 3, both optimizers (issue 12)
timeout 200 $EKD bench --json "$OUT/bench_live.json" --size base --device cuda --k 1,3 --modes multi_head \
    --reps 5 --warmup 2 --targets $WORK/store --workdir $WORK/bench
timeout 120 $EKD bench --json "$OUT/bench_fused.json" --size base --device cuda --k 3 --modes multi_head \
    --reps 5 --warmup 2 --runner-config runner_fused_adamw.yaml --workdir $WORK/bench

# 2. short fp16 pretraining on CUDA with bf16 teachers, then resume (issue 10); tiny teachers, noise audio
$EKD corpus synth $WORK/corpus --utterances 60 --speakers 4 >/dev/null 2>&1 || echo "no espeak-ng here: bench audio used"
AUDIO=$([ -d $WORK/corpus/wav ] && echo $WORK/corpus/wav || echo $WORK/bench/audio)
python3 - <<EOF
import yaml
from s3prl_ekd.plugin.teacher_formats import make_random_teacher
make_random_teacher("hubert", "$WORK/h.pt", seed=1); make_random_teacher("wavlm", "$WORK/w.pt", seed=2)
yaml.safe_dump({"teachers": [{"name": "hubert_local", "ckpt": "$WORK/h.pt"}, {"name": "wavlm_local", "ckpt": "$WORK/w.pt"}],
                "aggregation": "multi_head", "teacher_dtype": "bfloat16",
                "student": {"encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128, "encoder_attention_heads": 4}},
               open("$WORK/m.yaml", "w"))
EOF
O="config.pretrain_expert.datarc.audio_dir=$AUDIO,,config.runner.fp16=True,,config.runner.total_steps=40,,config.runner.save_step=20"
timeout 120 $EKD pretrain -u ekd_distiller -g $WORK/m.yaml -c "$($EKD configs tiny_cpu_runner.yaml)" -n gpu --device cuda -o "$O" \
    && timeout 60 $EKD pretrain -e $WORK/result/pretrain/gpu/states-20.ckpt --device cuda && echo "pretrain + resume: ok"

# 3. the one-GPU NCCL path (issue 15): world size 1 through torchrun
timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node 1 --no-python $(command -v s3prl-ekd || echo false) \
    pretrain -u ekd_distiller -g $WORK/m.yaml -c "$($EKD configs tiny_cpu_runner.yaml)" -n nccl --device cuda -o "$O" \
    && echo "torchrun NCCL world size 1: ok"
cp $WORK/result/pretrain/*/events.* "$OUT/" 2>/dev/null
echo "done"
