"""A synthetic English speech corpus spoken by espeak-ng, for running the SUPERB recipes offline.

Speakers are distinct espeak-ng voices, emotions are prosody styles, phone transcripts are the
phonemes espeak-ng reports for the very audio it wrote. Output: OUT/manifest.jsonl + OUT/wav/.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from s3prl_ekd.errors import UserError
from s3prl_ekd.io.audio import SAMPLE_RATE
from s3prl_ekd.io.files import atomic_write_json, atomic_write_text

MANIFEST_NAME = "manifest.jsonl"
CORPUS_INFO_NAME = "corpus.json"  # parameters of a finished corpus; its presence marks a folder as ours
GENERATOR_VERSION = 1  # bump when synthesis changes in a way corpus.json does not record
SPLITS = ("train", "dev", "test")
HELD_OUT = (0.1, 0.1)  # fractions of the utterances for dev and for test
# Marks espeak-ng writes into its phoneme output that are not phones: stress, the pause
# phonemes (`_:`, `_!`) that the `_` separator leaves as bare ":" / "!", and boundaries.
STRESS_MARKS = "',%="
NON_PHONE_TOKENS = {":", "!", "!!", "|", "||"}


@dataclass(frozen=True)
class Style:
    """A prosody style (= an emotion class): espeak-ng pitch 0-99, rate in words/min,
    amplitude 0-200, and SSML pitch range (how much the intonation varies)."""

    emotion: str
    pitch: int
    rate: int
    amplitude: int
    pitch_range: str


STYLES = (
    Style("neutral", pitch=50, rate=160, amplitude=100, pitch_range="medium"),
    Style("happy", pitch=72, rate=190, amplitude=130, pitch_range="x-high"),
    Style("sad", pitch=30, rate=115, amplitude=60, pitch_range="x-low"),
    Style("angry", pitch=55, rate=205, amplitude=190, pitch_range="high"),
)

# Speaker i uses variant VARIANTS[i % 12] of accent ACCENTS[i // 12]: up to 96 distinct voices.
VARIANTS = ("m1", "f1", "m2", "f2", "m3", "f3", "m4", "f4", "m5", "f5", "m6", "m7")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc",
           "en-gb-x-gbclan", "en-gb-x-gbcwmd")
MAX_SPEAKERS = len(VARIANTS) * len(ACCENTS)

# The built-in sentence generator: templates over small word lists (plain lowercase words,
# so the ASR transcripts use only A-Z and space).
WORDS = {
    "adj": "red green blue small large quiet busy happy young old bright dark warm cold "
           "heavy light quick slow gentle brave clever simple strange famous".split(),
    "noun": "teacher farmer doctor painter sailor baker child student singer driver "
            "garden river market window table letter basket bottle pencil mountain "
            "village kitchen candle blanket ladder engine orange apple castle forest".split(),
    "verb_past": "found carried painted opened watched cleaned bought moved pushed "
                 "followed visited repaired counted washed lifted dropped".split(),
    "verb": "read write build carry paint open watch clean find move follow visit".split(),
    "adverb": "slowly quickly quietly gladly often rarely carefully easily".split(),
    "prep": "near under behind beside across inside above below".split(),
    "name": "anna peter maria james linda robert susan thomas helen david".split(),
    "time": ["today", "yesterday", "tonight", "every morning", "this evening", "last summer"],
}
TEMPLATES = (
    "the {adj} {noun} {verb_past} the {noun}",
    "{name} {verb_past} a {adj} {noun} {prep} the {noun}",
    "a {adj} {noun} can {verb} the {noun} {adverb}",
    "{name} and {name} {verb_past} the {adj} {noun} {time}",
    "the {noun} {prep} the {noun} was {adj} {time}",
    "{time} the {noun} {adverb} {verb_past} a {noun}",
)


@dataclass(frozen=True)
class Speaker:
    speaker: str  # the id written to the manifest, e.g. "spk03"
    voice: str  # espeak-ng voice, e.g. "en-us+m2"


@dataclass(frozen=True)
class Utterance:
    id: str
    text: str
    speaker: Speaker
    style: Style
    split: str


def speakers(count: int) -> list[Speaker]:
    """The first `count` synthetic speakers, each a distinct espeak-ng voice."""
    if not 1 <= count <= MAX_SPEAKERS:
        raise UserError(f"--speakers {count}: use 1..{MAX_SPEAKERS} (distinct espeak-ng voices)")
    return [Speaker(f"spk{i:02d}", f"{ACCENTS[i // len(VARIANTS)]}+{VARIANTS[i % len(VARIANTS)]}")
            for i in range(count)]


def generate_sentences(count: int, seed: int) -> list[str]:
    """`count` distinct sentences from the built-in templates, the same for the same seed."""
    rng = random.Random(seed)
    sentences: dict[str, None] = {}  # insertion-ordered set
    for _ in range(count * 50):
        if len(sentences) == count:
            break
        template = rng.choice(TEMPLATES)
        # Draw without replacement per slot kind: "the sailor saw the sailor" is never made.
        pools = {key: rng.sample(words, len(words)) for key, words in WORDS.items()}
        words = [pools[chunk[1:-1]].pop() if chunk.startswith("{") else chunk
                 for chunk in template.split(" ")]
        sentences[" ".join(words)] = None
    if len(sentences) < count:
        raise UserError(f"--utterances {count}: the sentence generator gave only {len(sentences)} "
                        "distinct sentences; ask for fewer utterances")
    return list(sentences)


def plan_corpus(utterances: int, n_speakers: int, seed: int,
                held_out: tuple[float, float] = HELD_OUT) -> list[Utterance]:
    """Which sentence each utterance says, by whom, in which style and split (`held_out`: the
    fractions of the utterances for dev and for test).

    Every sentence is spoken once, so the splits have disjoint sentences (ASR/PR); within each
    split the speakers take turns and cycle through the styles, so every speaker appears in every
    split about equally often (SID) and every style is spoken by every speaker (ER).
    """
    if not all(0 < f for f in held_out) or sum(held_out) >= 0.7:
        raise UserError(f"--dev-fraction / --test-fraction {held_out}: use positive fractions that leave "
                        "at least 30% of the utterances for train")
    voices = speakers(n_speakers)
    dev, test = (max(n_speakers, len(STYLES), round(f * utterances)) for f in held_out)
    n_train = utterances - dev - test
    if n_train < max(dev, test):
        raise UserError(f"--utterances {utterances} is too few for {n_speakers} speakers: dev and "
                        f"test need {dev} and {test} (every speaker and style in each); "
                        f"use at least {2 * (dev + test)}")
    sentences = generate_sentences(utterances, seed)
    sizes = {"train": n_train, "dev": dev, "test": test}
    plan, start = [], 0
    for split in SPLITS:
        for k in range(sizes[split]):
            speaker = voices[k % n_speakers]
            style = STYLES[(k + k // n_speakers) % len(STYLES)]
            index = start + k
            plan.append(Utterance(f"{split}_{index:05d}", sentences[index], speaker, style, split))
        start += sizes[split]
    return plan


def parse_phones(espeak_output: str) -> list[str]:
    """espeak-ng `-x --sep=_` output -> phone tokens, stress marks removed.

    "h_@_l_'oU w_'3:_l_d" -> ["h", "@", "l", "oU", "w", "3:", "l", "d"]
    """
    phones = []
    for word in espeak_output.split():
        for token in word.split("_"):
            token = token.strip(STRESS_MARKS)
            if token and token not in NON_PHONE_TOKENS:
                phones.append(token)
    return phones


def check_espeak() -> str:
    """Path of espeak-ng, or a UserError saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise UserError("espeak-ng is not installed (needed to synthesise the corpus); install it "
                        "with `apt-get install espeak-ng` or run `make setup`")
    return path


def espeak_version() -> str:
    out = subprocess.run([check_espeak(), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.split("Data at")[0].strip()


def speak(utterance: Utterance, wav_path: Path) -> list[str]:
    """Synthesise `utterance` into a 16 kHz mono 16-bit `wav_path`; return the phones spoken."""
    import librosa
    import soundfile as sf

    style = utterance.style
    ssml = f'<speak><prosody range="{style.pitch_range}">{utterance.text}</prosody></speak>'
    with tempfile.TemporaryDirectory(prefix="espeak_") as tmp:
        raw = Path(tmp) / "raw.wav"
        # One call writes the audio and prints the phonemes of that same audio.
        result = subprocess.run(
            [check_espeak(), "-v", utterance.speaker.voice, "-p", str(style.pitch),
             "-s", str(style.rate), "-a", str(style.amplitude), "-m", "-x", "--sep=_",
             "-w", str(raw), ssml],
            capture_output=True, text=True)
        if result.returncode != 0 or not raw.is_file():
            raise UserError(f"espeak-ng failed for voice {utterance.speaker.voice} "
                            f"(exit {result.returncode}): {result.stderr.strip()}")
        wav, rate = sf.read(str(raw), dtype="float32")
    wav = librosa.resample(wav, orig_sr=rate, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    sf.write(str(wav_path), wav.clip(-1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    phones = parse_phones(result.stdout)
    if not phones:
        raise UserError(f"espeak-ng printed no phonemes for {utterance.text!r}")
    return phones


def _corpus_info(utterances: int, n_speakers: int, seed: int, held_out: tuple[float, float] = HELD_OUT) -> dict:
    generator = json.dumps([WORDS, TEMPLATES, VARIANTS, ACCENTS, STRESS_MARKS,
                            sorted(NON_PHONE_TOKENS)], sort_keys=True)
    return {"generator_version": GENERATOR_VERSION,
            "generator_sha256": hashlib.sha256(generator.encode()).hexdigest(),
            "utterances": utterances,
            "speakers": n_speakers, "seed": seed, "dev_test_fractions": list(held_out), "sample_rate": SAMPLE_RATE,
            "espeak": espeak_version(),
            "styles": [asdict(style) for style in STYLES]}


def corpus_state(out: Path, info: dict) -> str:
    """'complete' (this very corpus), 'unfinished' (an interrupted synthesis of it), 'new' (no such
    folder, or an empty one), 'other' (another corpus of ours) or 'foreign' (someone else's files)."""
    info_path, manifest = out / CORPUS_INFO_NAME, out / MANIFEST_NAME
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "new"
    if not info_path.is_file():
        return "foreign"
    recorded = json.loads(info_path.read_text())
    if {k: v for k, v in recorded.items() if k != "complete"} != info:
        return "other"
    if not recorded.get("complete") or not manifest.is_file():
        return "unfinished"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    complete = len(rows) == info["utterances"] and all((out / row["audio"]).is_file() for row in rows)
    return "complete" if complete else "unfinished"


def synthesize_corpus(out: str | os.PathLike, utterances: int, speakers: int, seed: int = 0,
                      workers: int | None = None, progress: bool = True, force: bool = False,
                      held_out: tuple[float, float] = HELD_OUT) -> Path:
    """Write the corpus to `out` and return the manifest path.

    Deterministic for (utterances, speakers, seed): if `out` already holds that very corpus, nothing
    is redone (an interrupted one is redone). Another corpus, or anything not made by
    `corpus synth`, is refused unless `force` (then only our files are replaced).
    """
    import soundfile as sf
    from tqdm import tqdm

    out = Path(out).resolve()
    check_espeak()
    info = _corpus_info(utterances, speakers, seed, held_out)
    state = corpus_state(out, info)
    if state == "complete":
        return out / MANIFEST_NAME
    if state in ("other", "foreign") and not force:
        holds = ("a corpus of other parameters" if state == "other"
                 else "files that `s3prl-ekd corpus synth` did not write")
        raise UserError(f"{out}: holds {holds}; choose another folder or pass --force to replace "
                        "the corpus there; nothing was changed")
    plan = plan_corpus(utterances, speakers, seed, held_out)
    # Start again, in the files we write only; corpus.json says so first, so that an interrupted
    # synthesis is recognised as ours and redone.
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CORPUS_INFO_NAME, {**info, "complete": False})
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    if (out / "wav").is_dir():
        shutil.rmtree(out / "wav")
    (out / "wav").mkdir(parents=True)

    def one(utterance: Utterance) -> dict:
        audio = Path("wav") / f"{utterance.id}.wav"
        phones = speak(utterance, out / audio)
        duration = sf.info(str(out / audio)).duration
        return {"id": utterance.id, "audio": str(audio), "text": utterance.text,
                "phones": " ".join(phones), "speaker": utterance.speaker.speaker,
                "emotion": utterance.style.emotion, "split": utterance.split,
                "voice": utterance.speaker.voice, "duration": round(duration, 3)}

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(tqdm(pool.map(one, plan), total=len(plan), desc="espeak-ng",
                         disable=not progress, unit="utt"))
    manifest = atomic_write_text(out / MANIFEST_NAME, "".join(json.dumps(row) + "\n" for row in rows))
    atomic_write_json(out / CORPUS_INFO_NAME, {**info, "complete": True})
    return manifest


def register_cli(subparsers) -> None:
    corpus = subparsers.add_parser("corpus", help="synthetic speech corpora")
    commands = corpus.add_subparsers(dest="corpus_command", required=True, metavar="COMMAND")
    p = commands.add_parser("synth", help="speak generated English sentences with espeak-ng "
                                          "(voices = speakers, prosody styles = emotions)")
    p.add_argument("out", help="output folder (manifest.jsonl and wav/)")
    p.add_argument("--utterances", type=int, default=1200)
    p.add_argument("--speakers", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="parallel espeak-ng calls")
    p.add_argument("--dev-fraction", type=float, default=HELD_OUT[0], help="fraction of the utterances for dev")
    p.add_argument("--test-fraction", type=float, default=HELD_OUT[1], help="fraction of the utterances for test")
    p.add_argument("--force", action="store_true", help="replace another corpus (or other files) in OUT")

    def _synth(args) -> int:
        held_out = (args.dev_fraction, args.test_fraction)
        info = _corpus_info(args.utterances, args.speakers, args.seed, held_out)
        if corpus_state(Path(args.out).resolve(), info) == "complete":
            print(f"{Path(args.out) / MANIFEST_NAME}: up to date (same utterances, speakers and seed)")
            return 0
        manifest = synthesize_corpus(args.out, args.utterances, args.speakers, args.seed,
                                     workers=args.workers, force=args.force, held_out=held_out)
        print(f"wrote {manifest}")
        return 0

    p.set_defaults(func=_synth)
