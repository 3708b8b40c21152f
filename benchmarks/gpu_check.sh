#!/usr/bin/env bash
# The GPU checks of issues 10, 12 and 15 as one script for the `device` tool (one H100/H200, torch
# 2.11 preinstalled, no internet). What a user does on a current-stack GPU box, in this order:
#   1. install the built wheel with the [espnet] extra into that environment (missing wheels from .whl/);
#   2. `pretrain --device cuda`: fp16 student, the three shipped mini teachers in bf16 (multi_head),
#      40 steps; then resume from step 20 and compare the losses of steps 21-40;
#   3. the same run through torchrun (NCCL, world size 1), losses compared with step 2's;
#   4. `superb --profile superb` on the student, a few steps per task, on CUDA;
#   5. `bench --size base`: live K = 1, 3 and cached, then K = 3 with the positional convolutions left
#      to autocast (--no-fp32-pos-conv), then with PyTorch's fused AdamW.
# Each step has its own time limit (against hangs; the whole script took 440 s on an H200); every
# figure lands in $OUT (at most 8 files: the device tool's limit). Exit status: the number of failed checks.
#
# Before the call, on the CPU machine (both folders are git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl espnet-s3prl==2026.5.14 transformers==4.57.6 \
#       huggingface_hub==0.36.2 tokenizers==0.22.2 easydict==1.14 editdistance==0.8.1 soundfile==0.14.0 \
#       soxr==1.1.0 librosa==0.11.0 audioread==3.1.0 lazy-loader==0.6 pooch==1.9.0 tensorboardX==2.6.5 \
#       omegaconf==2.4.0 platformdirs==4.14.8 decorator==5.3.1 cffi==2.1.1 pycparser==3.12
#   s3prl-ekd corpus synth .gpu/corpus --utterances 80 --speakers 4     # espeak-ng is not on the GPU machine
# Then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=560).
# A CPU dry run of the same steps (tiny sizes, no install): DEV=cpu INSTALL=0 bash benchmarks/gpu_check.sh
set -uo pipefail
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check}
DEV=${DEV:-cuda}
WORK=${WORK:-/tmp/ekd_gpu}
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK"
exec 3>&1 4>&2 > >(tee "$OUT/gpu_check.log") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1
FAILED=0
step() { echo; echo "=== $(date +%T) $*"; }
verdict() { echo "CHECK $1: $2"; [[ $2 == FAILED* ]] && FAILED=$((FAILED + 1)); return 0; }

if [ "${INSTALL:-1}" = 1 ]; then
    step "install the built wheel [espnet]; dependencies this environment lacks come from .whl/"
    python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$WORK/dist" . || exit 1
    WHEEL=$(ls "$WORK"/dist/s3prl_ekd-*.whl)
    if python3 -m pip install -q --no-index --find-links .whl "$WHEEL[espnet]"; then
        verdict install "pip resolved the [espnet] extra from this environment + .whl"
    else
        python3 -m pip install -q --no-index --no-deps .whl/*.whl "$WHEEL" || exit 1
        verdict install "resolver failed (above); every carried wheel installed with --no-deps"
    fi
fi
cd "$WORK"  # as a user: outside the checkout
python3 - <<'EOF'
import importlib.metadata as md, torch, s3prl_ekd
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")
print("s3prl_ekd from", s3prl_ekd.__file__)
for name in ("s3prl-ekd", "espnet-s3prl", "s3prl", "transformers", "huggingface_hub", "numpy", "torchaudio"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF

if [ "$DEV" = cuda ]; then FP16=True TDTYPE=bfloat16 SIZE=base BENCH="" STEPS=30
else FP16=False TDTYPE=float32 SIZE=tiny BENCH="--batch-size 2 --seconds 1 --reps 1 --warmup 0 --threads 2" STEPS=2; fi
CORPUS=$ROOT/.gpu/corpus
python3 - "$TDTYPE" <<'EOF'
import sys, yaml
from s3prl_ekd.io.resources import pretrain_config
student = yaml.safe_load(pretrain_config("tiny_cpu.yaml").read_text())["student"]
teachers = [{"name": hub, "ckpt": str(pretrain_config(f"teachers/{name}.pt"))}
            for hub, name in (("hubert_local", "hubert"), ("hubert_local", "robust_hubert"), ("wavlm_local", "wavlm"))]
yaml.safe_dump({"teachers": teachers, "aggregation": "multi_head", "teacher_dtype": sys.argv[1], "student": student},
               open("model.yaml", "w"))
EOF
RUNNER=$(s3prl-ekd configs tiny_cpu_runner.yaml)
O="config.pretrain_expert.datarc.audio_dir=$CORPUS/wav,,config.pretrain_expert.datarc.train_batch_size=8"
O="$O,,config.runner.fp16=$FP16,,config.runner.total_steps=40,,config.runner.save_step=20,,config.runner.max_keep=4"
EXP=$WORK/result/pretrain

step "pretrain --device $DEV: fp16=$FP16, teachers $TDTYPE, 40 steps"
timeout 180 s3prl-ekd pretrain -u ekd_distiller -g model.yaml -c "$RUNNER" -n plain --device "$DEV" -o "$O" --seed 0 \
    && verdict pretrain ok || verdict pretrain FAILED
mkdir -p ev_plain ev_resume && cp "$EXP"/plain/events.* ev_plain/ 2>/dev/null
step "resume from states-20"
rm -f "$EXP"/plain/states-40.ckpt "$EXP"/plain/states-epoch-*.ckpt
timeout 120 s3prl-ekd pretrain -e "$EXP/plain/states-20.ckpt" --device "$DEV" && verdict resume ok || verdict resume FAILED
for f in "$EXP"/plain/events.*; do [ -e "ev_plain/$(basename "$f")" ] || mv "$f" ev_resume/; done

step "torchrun, world size 1 ($([ "$DEV" = cuda ] && echo NCCL || echo gloo))"
timeout 180 python3 -m torch.distributed.run --standalone --nproc-per-node 1 --no-python "$(command -v s3prl-ekd)" \
    pretrain -u ekd_distiller -g model.yaml -c "$RUNNER" -n ddp --device "$DEV" -o "$O" --seed 0 \
    && verdict torchrun ok || verdict torchrun FAILED

python3 - "$OUT/pretrain_losses.json" "$EXP/ddp" <<'EOF'
import json, sys
from s3prl_ekd.io.events import read_scalars
def losses(folder):
    tags = {t: v for t, v in read_scalars(folder).items() if t.endswith("train-loss")}
    return dict(next(iter(tags.values()))) if tags else {}
plain, resumed, ddp = losses("ev_plain"), losses("ev_resume"), losses(sys.argv[2])
def compare(a, b):
    """Step by step where both have a loss; and the mean of the last 10 steps of each."""
    steps = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in steps]
    last = steps[-10:]
    return {"steps": [steps[0], steps[-1]] if steps else [], "count": len(steps),
            "first_step_relative_difference": diffs[0] if diffs else None,
            "max_relative_difference": max(diffs) if diffs else None,
            "last10_mean": [sum(a[s] for s in last) / len(last), sum(b[s] for s in last) / len(last)] if last else None}
report = {"plain": plain, "resumed": resumed, "ddp_world_size_1": ddp,
          "resume_vs_plain": compare(plain, resumed), "ddp_vs_plain": compare(plain, ddp)}
json.dump(report, open(sys.argv[1], "w"), indent=1)
first, last = (plain[min(plain)], plain[max(plain)]) if plain else (None, None)
print(f"plain: {len(plain)} losses, step 1 {first}, step 40 {last}")
print("resume vs plain:", report["resume_vs_plain"], "| torchrun vs plain:", report["ddp_vs_plain"])
EOF

CKPT=$(ls -t "$EXP"/plain/states-*.ckpt 2>/dev/null | head -1)  # the resumed run's last checkpoint
step "prepare + superb --profile superb, $STEPS steps per task, on $DEV, upstream ekd_distiller -k $CKPT"
timeout 60 s3prl-ekd prepare all --manifest "$CORPUS/manifest.jsonl" --out data >/dev/null || verdict prepare FAILED
if [ -z "$CKPT" ]; then verdict superb "FAILED (no student checkpoint from the pretrain step)"
else timeout 200 s3prl-ekd superb -u ekd_distiller -k "$CKPT" --data data --tasks pr,sid,er,asr \
    --profile superb --steps $STEPS --device "$DEV" --out superb \
    && verdict superb ok || verdict superb FAILED; fi
cp superb/results.json "$OUT/superb_results.json" 2>/dev/null

step "bench --size $SIZE: live K=1,3 and cached (store of K=3), multi_head"
timeout 240 s3prl-ekd bench --json "$OUT/bench_live.json" --size $SIZE --device "$DEV" --k 1,3 --modes multi_head \
    --reps 5 --warmup 2 --loader-steps 4 --targets "$WORK/store" --workdir "$WORK/bench" $BENCH \
    && verdict bench ok || verdict bench FAILED
step "bench K=3, positional convolutions left to autocast"
timeout 150 s3prl-ekd bench --json "$OUT/bench_posconv_autocast.json" --md "$WORK/posconv.md" --size $SIZE \
    --device "$DEV" --k 3 --modes multi_head --reps 5 --warmup 2 --loader-steps 2 --no-fp32-pos-conv \
    --workdir "$WORK/bench" $BENCH && verdict bench_posconv ok || verdict bench_posconv FAILED
step "bench K=3, PyTorch's fused AdamW"
timeout 150 s3prl-ekd bench --json "$OUT/bench_fused_adamw.json" --md "$WORK/fused.md" --size $SIZE \
    --device "$DEV" --k 3 --modes multi_head --reps 5 --warmup 2 --loader-steps 2 \
    --runner-config runner_fused_adamw.yaml --workdir "$WORK/bench" $BENCH \
    && verdict bench_fused ok || verdict bench_fused FAILED
step "done: $FAILED check(s) failed"
exec 1>&3 2>&4 && wait $TEE  # the whole log is on disk before the device tool collects $OUT
exit $FAILED
