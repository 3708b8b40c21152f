"""What `--share-cnn-features` saves on one upstream pass: an ekd_distiller student's hidden states per
utterance (run alone, as `--memoize-upstream` runs them) computed in full, against the same with the CNN's
output read from a shared folder that another run filled. Utterance by utterance, the two interleaved, in
one process, one thread; the states must be equal bit for bit.

    python benchmarks/shared_cnn_features.py CKPT AUDIO_DIR [--utterances 400] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import soundfile as sf
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="an ekd_distiller checkpoint (states-*.ckpt)")
    parser.add_argument("audio", help="a folder of 16 kHz wav files")
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import s3prl.hub

    from s3prl_ekd import _startup
    from s3prl_ekd.plugin.downstream import SharedCNNFeatures

    _startup.install()
    torch.set_num_threads(1)
    upstream = s3prl.hub.ekd_distiller(ckpt=args.ckpt).eval()
    student = upstream.student
    files = sorted(Path(args.audio).glob("*.wav"))[:args.utterances]
    waves = [torch.from_numpy(sf.read(f, dtype="float32")[0]) for f in files]
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        student.cnn_features = SharedCNNFeatures(folder)
        for wave in waves:  # another run fills the folder
            upstream([wave])
        computed, shared, equal = [], [], True
        for wave in waves:
            student.cnn_features = None
            start = time.perf_counter()
            full = upstream([wave])["hidden_states"]
            computed.append(time.perf_counter() - start)
            student.cnn_features = SharedCNNFeatures(folder)
            start = time.perf_counter()
            read = upstream([wave])["hidden_states"]
            shared.append(time.perf_counter() - start)
            equal &= all(torch.equal(a, b) for a, b in zip(full, read))
    seconds = sum(len(w) for w in waves) / 16000
    figures = {"utterances": len(waves), "audio_s": round(seconds, 1), "computed_s": round(sum(computed), 2),
               "shared_s": round(sum(shared), 2), "ratio": round(sum(shared) / sum(computed), 3),
               "median_ms": [round(1000 * statistics.median(computed), 1), round(1000 * statistics.median(shared), 1)],
               "bit_identical": equal, "torch": torch.__version__}
    print(json.dumps(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    if not equal:
        raise SystemExit("the states read through the shared folder differ from the computed ones")


if __name__ == "__main__":
    main()
