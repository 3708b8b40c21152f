"""The phoneme-recognition corpus loader that s3prl's `ctc` expert imports but the wheel lacks.

s3prl's `downstream/ctc/data.py` does `from .corpus.libriphone import LibriPhoneDataset` for
`corpus.name: libriphone`; `s3prl_ekd.plugin.hub` makes that import resolve to this module.
It reads a LibriSpeech-style tree ({path}/{set}/**/*.flac beside {spk}-{chap}.trans.txt) and
builds phone targets either from the words and a lexicon (`transcripts: words`, s3prl's
behaviour: first pronunciation wins) or from exact per-utterance phone transcripts
{spk}-{chap}.phones.txt written by `s3prl-ekd prepare pr` (`transcripts: phones`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from s3prl_ekd.errors import ConfigError, UserError

TRANSCRIPT_KINDS = ("words", "phones")


def read_lexicon(paths: Sequence[str | Path]) -> dict[str, list[str]]:
    """WORD -> phones from `WORD PH PH ...` lines; the first pronunciation of a word wins."""
    lexicon: dict[str, list[str]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: lexicon file not found (downstream_expert.corpus.lexicon)")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise UserError(f"{path}:{number}: lexicon line has a word but no phones")
            lexicon.setdefault(fields[0], fields[1:])
    return lexicon


def read_transcripts(path: Path) -> dict[str, str]:
    """`UTTID rest of line` -> {UTTID: rest}; a missing file is a clear error."""
    if not path.is_file():
        raise UserError(f"{path}: transcript file not found beside the audio it describes")
    out = {}
    for line in path.read_text().splitlines():
        utt, _, rest = line.strip().partition(" ")
        if utt:
            out[utt] = rest.strip()
    return out


def utterance_phones(audio: Path, transcripts: str, lexicon: dict[str, list[str]],
                     cache: dict[Path, dict[str, str]]) -> list[str]:
    """The phone sequence of LibriSpeech-style file `audio` ({spk}-{chap}-{n}.flac)."""
    utt = audio.name.split(".")[0]
    group = utt.rsplit("-", 1)[0]
    suffix = ".trans.txt" if transcripts == "words" else ".phones.txt"
    table_path = audio.parent / f"{group}{suffix}"
    if table_path not in cache:
        cache[table_path] = read_transcripts(table_path)
    line = cache[table_path].get(utt)
    if line is None:
        raise UserError(f"{table_path}: has no line for utterance {utt} ({audio})")
    if transcripts == "phones":
        return line.split()
    phones = []
    for word in line.split():
        if word not in lexicon:
            raise UserError(f"{audio}: word {word!r} is not in the lexicon; add it to the "
                            "lexicon file (downstream_expert.corpus.lexicon)")
        phones += lexicon[word]
    return phones


class LibriPhoneDataset(Dataset):
    """(audio path, phone token ids) pairs, longest transcripts first, optionally bucketed.

    Same constructor and items as the dataset s3prl's ctc expert expects: with bucket_size > 1
    an item is a list of bucket_size consecutive pairs (the loader then uses batch_size=1).
    """

    def __init__(self, split: Sequence[str], tokenizer, bucket_size: int, path: str,
                 lexicon: Sequence[str] = (), ascending: bool = False,
                 transcripts: str = "words", **kwargs):
        if transcripts not in TRANSCRIPT_KINDS:
            raise ConfigError(f"downstream_expert.corpus.transcripts: {transcripts!r}; "
                              f"use one of {TRANSCRIPT_KINDS}")
        self.bucket_size = bucket_size
        word_phones = read_lexicon(lexicon) if transcripts == "words" else {}
        if transcripts == "words" and not word_phones:
            raise ConfigError("downstream_expert.corpus.lexicon: empty; `transcripts: words` "
                              "needs a lexicon (or prepare exact phones: transcripts: phones)")
        files: list[Path] = []
        for name in split:
            found = sorted(Path(path, name).rglob("*.flac"))
            if not found:
                raise UserError(f"{Path(path, name)}: no .flac files (the PR recipe reads "
                                "LibriSpeech-style flac trees; run `s3prl-ekd prepare pr`)")
            files += found
        known = set(tokenizer._vocab2idx)
        cache: dict[Path, dict[str, str]] = {}
        pairs = []
        for audio in files:
            phones = utterance_phones(audio, transcripts, word_phones, cache)
            unknown = sorted(set(phones) - known)
            if unknown:
                raise UserError(f"{audio}: phones {unknown} are not in the vocabulary "
                                "(downstream_expert.text.vocab_file); add them there")
            pairs.append((audio, tokenizer.encode(" ".join(phones))))
        if len(pairs) < bucket_size:
            raise UserError(f"{path} {list(split)}: {len(pairs)} utterances, fewer than the "
                            f"batch size {bucket_size}; lower downstream_expert.corpus.batch_size")
        pairs.sort(key=lambda pair: len(pair[1]), reverse=not ascending)
        self.file_list = [audio for audio, _ in pairs]
        self.text = [tokens for _, tokens in pairs]

    def __getitem__(self, index):
        if self.bucket_size > 1:
            start = min(len(self.file_list) - self.bucket_size, index)
            stop = start + self.bucket_size
            return list(zip(self.file_list[start:stop], self.text[start:stop]))
        return self.file_list[index], self.text[index]

    def __len__(self):
        return len(self.file_list)
