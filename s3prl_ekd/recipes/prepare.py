"""`s3prl-ekd prepare`: the PR/ASR/SID/ER layouts from a manifest or from the real corpora."""

from __future__ import annotations

from s3prl_ekd.errors import UserError
from s3prl_ekd.recipes import iemocap, librispeech, voxceleb1
from s3prl_ekd.recipes.layout import TASKS, PrepareReport, prepare_all, prepare_asr, prepare_er, prepare_pr, prepare_sid


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="make the PR/ASR/SID/ER recipe layouts from a "
                                              "manifest or the real corpora, checking every file")
    p.add_argument("task", choices=[*TASKS, "all"])
    p.add_argument("--out", required=True, help="output folder (one sub-folder per task)")
    p.add_argument("--manifest", help="manifest.jsonl (e.g. from `s3prl-ekd corpus synth`)")
    p.add_argument("--librispeech", help="LibriSpeech root (pr, asr)")
    p.add_argument("--lexicon", action="append", default=[], help="word lexicon for pr on LibriSpeech")
    p.add_argument("--voxceleb1", help="VoxCeleb1 root holding dev/wav and test/wav (sid)")
    p.add_argument("--split-file", help="VoxCeleb1 identification split (iden_split.txt)")
    p.add_argument("--iemocap", help="IEMOCAP_full_release root (er)")
    p.add_argument("--pr-vocab", help="phone vocabulary for pr (default: the recipe's)")
    p.add_argument("--noisy-snr", type=float, help="pr from a manifest: also a test copy with white noise at "
                                                   "this SNR in dB (superb then reports pr_noisy)")

    def _prepare(args) -> int:
        for report in _dispatch(args):
            print(report)
        return 0

    p.set_defaults(func=_prepare)


def _dispatch(args) -> list[PrepareReport]:
    real = {"librispeech": args.librispeech, "voxceleb1": args.voxceleb1, "iemocap": args.iemocap}
    if args.manifest:
        if any(real.values()):
            raise UserError("give either --manifest or the real corpus folders, not both")
        if args.task == "all":
            return list(prepare_all(args.manifest, args.out, args.pr_vocab, progress=True,
                                    noisy_snr_db=args.noisy_snr).values())
        if args.task == "pr":
            return [prepare_pr(args.manifest, args.out, vocab=args.pr_vocab, progress=True,
                               noisy_snr_db=args.noisy_snr)]
        builders = {"asr": prepare_asr, "sid": prepare_sid, "er": prepare_er}
        return [builders[args.task](args.manifest, args.out, progress=True)]
    wanted = TASKS if args.task == "all" else (args.task,)
    needs = {"pr": "librispeech", "asr": "librispeech", "sid": "voxceleb1", "er": "iemocap"}
    reports = []
    for task in wanted:
        source = real[needs[task]]
        if source is None:
            raise UserError(f"prepare {task}: pass --manifest or --{needs[task]} DIR")
        if task == "pr":
            reports.append(librispeech.prepare_pr_librispeech(source, args.out, args.lexicon,
                                                  vocab=args.pr_vocab, progress=True))
        elif task == "asr":
            reports.append(librispeech.prepare_asr_librispeech(source, args.out, progress=True))
        elif task == "sid":
            reports.append(voxceleb1.prepare_sid_voxceleb1(source, args.out, args.split_file, progress=True))
        else:
            reports.append(iemocap.prepare_er_iemocap(source, args.out, progress=True))
    return reports
