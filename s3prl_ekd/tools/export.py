"""`s3prl-ekd export`: a student checkpoint as a folder ready for a model hub, in one of two formats.

- `superb` (default): the SUPERB hidden-set submission that s3prl's `run_downstream.py --hub
  huggingface` loads: expert.py, model.pt, requirements.txt and a copy of the modules the upstream
  needs, under a package name of its own.
- `transformers`: a HubertModel folder (config.json, model.safetensors, preprocessor_config.json) that
  `AutoModel` / `AutoFeatureExtractor.from_pretrained` load without s3prl (see hf_export.py).

Both get a model card (README.md with the hub's metadata block) and a .gitattributes that stores large
files with Git LFS. Every input is checked before anything is written; the folder is built beside OUT
and renamed into place when complete.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from s3prl_ekd import __version__
from s3prl_ekd.errors import ConfigError, UserError
from s3prl_ekd.io.audio import SAMPLE_RATE
from s3prl_ekd.io.checkpoint import TEACHER_FINGERPRINTS_KEY, load_raw, model_dict
from s3prl_ekd.tools.hf_export import HEADS_FILE

if TYPE_CHECKING:
    import torch

    from s3prl_ekd.core.student import EKDStudent

# transformers, s3prl and the expert are imported inside the functions: the CLI imports this module
# for `s3prl-ekd export --help`.

FORMATS = ("superb", "transformers")
DEFAULT_LICENSE = "apache-2.0"  # the hub's id of s3prl-ekd's own license
# The SUPERB folder carries copies of these modules in a package named by `vendored_package_name`,
# with their imports rewritten to it: s3prl appends the folder to sys.path, so under the name
# `s3prl_ekd` an installed s3prl-ekd (of any version) would be imported instead of the copy.
VENDORED_MODULES = ("s3prl_ekd.errors", "s3prl_ekd.io.strict", "s3prl_ekd.io.checkpoint",
                    "s3prl_ekd.core.frames", "s3prl_ekd.core.student",
                    "s3prl_ekd.upstream.ekd_distiller.expert")
MODEL_FILE = "model.pt"
REQUIRED_DISTRIBUTIONS = ("torch", "torchaudio", "PyYAML")  # plus the s3prl distribution installed here
SUPERB_FILES = ("expert.py", MODEL_FILE, "requirements.txt")
TRANSFORMERS_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", HEADS_FILE)
CARD_FILES = ("README.md", ".gitattributes")
# Large files the hub stores with Git LFS (as in the hub's own default .gitattributes).
LFS_PATTERNS = ("*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt", "*.h5", "*.onnx", "*.npy", "*.npz",
                "*.tar", "*.tar.*", "*.gz", "*.zip")
_VENDORED_PACKAGE = re.compile(r"s3prl_ekd(_v\w+_[0-9a-f]{8})?")  # copies of every version, and the old `s3prl_ekd`
_IMPORT_LINE = re.compile(r"^(\s*(?:from|import)\s+)s3prl_ekd(?=[.\s])", re.MULTILINE)
LIBRISPEECH_SETS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other")


# --- the SUPERB folder's package -------------------------------------------------------------------

def module_source(module_name: str) -> str:
    spec = importlib.util.find_spec(module_name)
    return Path(spec.origin).read_text()


def vendored_package_name() -> str:
    """'s3prl_ekd_v<version>_<8 hex digits of the copied sources>', e.g. s3prl_ekd_v0_2_0_1a2b3c4d."""
    digest = hashlib.sha256()
    for module_name in VENDORED_MODULES:
        digest.update(module_name.encode() + b"\0" + module_source(module_name).encode() + b"\0")
    return f"s3prl_ekd_v{re.sub(r'[^0-9A-Za-z]', '_', __version__)}_{digest.hexdigest()[:8]}"


def rewrite_imports(source: str, package: str) -> str:
    """`source` with every `from s3prl_ekd...` / `import s3prl_ekd...` statement importing `package`."""
    rewritten = _IMPORT_LINE.sub(lambda m: m.group(1) + package, source)
    for node in ast.walk(ast.parse(rewritten)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(name == "s3prl_ekd" or name.startswith("s3prl_ekd.") for name in names):
            raise AssertionError(f"an import of s3prl_ekd was not rewritten to {package}: {names}")
    return rewritten


def write_vendored_package(outdir: Path, package: str) -> None:
    """outdir/<package>/...: VENDORED_MODULES with their imports rewritten, and empty package
    __init__ files (so none of the original package's start-up checks run)."""
    for module_name in VENDORED_MODULES:
        parts = [package, *module_name.split(".")[1:]]
        for depth in range(1, len(parts)):
            folder = outdir.joinpath(*parts[:depth])
            folder.mkdir(exist_ok=True)
            init = folder / "__init__.py"
            if not init.exists():
                init.write_text('"""Copied by `s3prl-ekd export`: what the SUPERB upstream needs of s3prl-ekd."""\n')
        outdir.joinpath(*parts).with_suffix(".py").write_text(rewrite_imports(module_source(module_name), package))


def expert_shim(package: str) -> str:
    return (f'"""SUPERB upstream entry point: the EKD student of model.pt (written by `s3prl-ekd export`)."""\n'
            f"from {package}.upstream.ekd_distiller.expert import UpstreamExpert  # noqa: F401\n")


def requirements() -> str:
    """Pins of what the upstream imports, taken from this environment (s3prl or espnet-s3prl)."""
    import importlib.metadata

    from s3prl_ekd.stack import s3prl_distribution

    lines = []
    for name in (*REQUIRED_DISTRIBUTIONS, s3prl_distribution()):
        version = importlib.metadata.version(name).split("+")[0]  # drop local tags like +cu128
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


# --- figures ---------------------------------------------------------------------------------------

@dataclass
class ParameterCount:
    total: int
    backbone: int  # CNN + transformer: what `hidden_states: backbone` runs
    heads: int


def count_parameters(model: EKDStudent) -> ParameterCount:
    backbone = sum(p.numel() for p in model.backbone.parameters())
    heads = sum(p.numel() for p in model.heads.parameters())
    return ParameterCount(backbone + heads, backbone, heads)


@dataclass
class Speed:
    device: str
    audio_seconds: float
    seconds: float  # median wall time of one forward

    @property
    def real_time_factor(self) -> float:
        return self.seconds / self.audio_seconds


def measure_speed(model, forward: Callable[[Any, torch.Tensor], Any], audio_seconds: float = 10.0,
                  device: str = "cpu", repeats: int = 3) -> Speed:
    """Median time of `forward(model, wav)` on one utterance (S,) of `audio_seconds` (after a warm-up)."""
    import torch

    model = model.to(device).eval()
    wav = torch.randn(int(audio_seconds * SAMPLE_RATE), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            forward(model, wav)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    label = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    return Speed(label, audio_seconds, sorted(times)[len(times) // 2])


# --- what the card says ----------------------------------------------------------------------------

@dataclass
class TeacherFingerprint:
    sha256: str   # hex, "hub:<name>", or "unknown"
    source: str   # "checkpoint" (recorded at training), "file" (hashed at export), "unknown"


def teacher_fingerprints(raw: dict, state: dict) -> list[TeacherFingerprint]:
    """Each teacher's checkpoint sha256: as the checkpoint recorded it, else the file its model config
    names (hashed now, so only as good as that file is unchanged), else unknown."""
    from s3prl_ekd.io.files import file_sha256

    teachers = state["teachers"]
    recorded = raw.get(TEACHER_FINGERPRINTS_KEY, state.get("teacher_fingerprints"))
    if isinstance(recorded, (list, tuple)) and len(recorded) == len(teachers):
        return [TeacherFingerprint(str(value), "checkpoint") for value in recorded]
    configs = (state.get("model_config") or {}).get("teachers") or []
    out = []
    for k in range(len(teachers)):
        ckpt = configs[k].get("ckpt") if k < len(configs) else None
        if ckpt and "://" not in str(ckpt) and Path(ckpt).is_file():
            out.append(TeacherFingerprint(file_sha256(ckpt), "file"))
        else:
            out.append(TeacherFingerprint("unknown", "unknown"))
    return out


def runner_config(raw: dict, state: dict) -> dict:
    """s3prl's runner config (-c) the student was trained with: {} when the checkpoint lacks it."""
    config = raw.get("Config") if isinstance(raw.get("Config"), dict) else state.get("runner_config")
    return config if isinstance(config, dict) else {}


def is_plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def known_datasets(datarc: dict) -> list[str]:
    """Hub dataset ids of the training data, where the runner config says which (LibriSpeech)."""
    sets = datarc.get("sets") or []
    if "libri_root" in datarc or any(str(s) in LIBRISPEECH_SETS for s in sets):
        return ["openslr/librispeech_asr"]
    return []


def read_superb_results(path: str | Path, ckpt: str | Path) -> dict:
    """results.json of `s3prl-ekd superb`, checked to be this checkpoint's (by the sha256 it records,
    else by the resolved path of its upstream checkpoint)."""
    from s3prl_ekd.io.files import file_sha256

    path = Path(path)
    hint = f"pass the results.json that `s3prl-ekd superb -u ekd_distiller -k {ckpt}` wrote"
    if not path.is_file():
        raise UserError(f"{path}: --superb-results file not found; {hint}")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not a results.json of `s3prl-ekd superb` ({error}); {hint}") from None
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
        raise UserError(f"{path}: not a results.json of `s3prl-ekd superb` (no 'tasks' table); {hint}")
    recorded = results.get("upstream_ckpt_sha256")
    if recorded:
        if recorded != file_sha256(ckpt):
            raise UserError(f"{path}: results of another checkpoint (sha256 {recorded[:12]}..., not {ckpt}'s); {hint}")
    else:
        theirs = results.get("upstream_ckpt")
        if not theirs or Path(theirs).resolve() != Path(ckpt).resolve():
            raise UserError(f"{path}: results of {theirs or 'no checkpoint'} (upstream {results.get('upstream')}), "
                            f"not of {ckpt}; {hint}")
    return results


@dataclass
class ExportOptions:
    """What `export` writes; every field is checked before anything is written."""

    format: str = "superb"               # one of FORMATS
    force: bool = False                  # replace a non-empty OUT (entries an export does not write are kept)
    speed_seconds: float = 10.0          # audio length of the inference-speed figure; 0 skips it
    device: str | None = None            # for the speed figure; None: cuda when available, else cpu
    with_heads: bool = False             # transformers: also write the prediction heads (HEADS_FILE)
    license: str = DEFAULT_LICENSE       # the card's license (a hub license id)
    superb_results: str | None = None    # results.json of `s3prl-ekd superb` on this checkpoint


@dataclass
class ExportReport:
    outdir: Path
    format: str
    step: int
    parameters: ParameterCount
    speed: Speed | None
    hidden_states: list[str]
    downsample_rate: int
    files: dict[str, int] = field(default_factory=dict)  # top-level entry -> bytes (a folder: its files')
    package: str | None = None             # superb: the copied package's name
    model_parameters: int | None = None    # transformers: the HubertModel's parameters
    round_trip: list[float] | None = None  # transformers: largest |student - HubertModel| per hidden state
    heads_written: bool = False

    def summary(self) -> str:
        p = self.parameters
        lines = [f"exported step {self.step} to {self.outdir} (format {self.format})",
                 f"parameters: {p.total:,} ({p.total / 1e6:.2f} M): backbone {p.backbone:,} + heads {p.heads:,}"]
        if self.format == "transformers":
            lines.append(f"HubertModel: {self.model_parameters:,} parameters"
                         + identity_note(self.model_parameters - p.backbone))
            lines.append("round trip (largest |difference| to the student): " + ", ".join(
                f"{name} {diff:.1e}" for name, diff in zip(self.hidden_states, self.round_trip)))
            lines.append(f"prediction heads ({p.heads:,} parameters, not part of HubertModel): written to {HEADS_FILE}"
                         if self.heads_written else
                         f"not exported: the prediction heads ({p.heads:,} parameters) are not part of HubertModel; "
                         f"--with-heads writes them to {HEADS_FILE}")
        lines.append(f"hidden states: {len(self.hidden_states)} = {', '.join(self.hidden_states)}")
        if self.speed:
            s = self.speed
            lines.append(f"inference: {s.seconds * 1000:.1f} ms for {s.audio_seconds:g} s of audio on {s.device}, "
                         f"real-time factor {s.real_time_factor:.4f}")
        total = sum(self.files.values())
        lines.append(f"files ({total / 1e6:.2f} MB): " + ", ".join(f"{name} ({size / 1e3:.1f} kB)"
                                                                   for name, size in self.files.items()))
        lines.append(f"upload: {upload_command(self.outdir)}")
        return "\n".join(lines)


def identity_note(extra: int) -> str:
    return (f" (the student's backbone plus {extra:,} of an identity projection standing for s3prl's absent "
            "post_extract_proj)" if extra else " (the student's backbone)")


def upload_command(outdir: Path) -> str:
    repo = "YOUR_NAME/MODEL_NAME"
    return (f"hf upload {repo} {shlex.quote(str(outdir))} .   (or in Python: huggingface_hub.create_repo({repo!r}, "
            f"exist_ok=True); huggingface_hub.upload_folder(repo_id={repo!r}, folder_path={str(outdir)!r}))")


# --- checks before anything is written -------------------------------------------------------------

def check_options(options: ExportOptions) -> str:
    """Everything about `options` that needs no checkpoint; returns the resolved device."""
    from s3prl_ekd.devices import resolve_device

    if options.format not in FORMATS:
        raise ConfigError(f"--format {options.format!r}: use one of {', '.join(FORMATS)}")
    if options.with_heads and options.format != "transformers":
        raise ConfigError("--with-heads: the superb format's model.pt holds the heads already; "
                          "use --with-heads with --format transformers")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", options.license or ""):
        raise ConfigError(f"--license {options.license!r}: give a license id of the hub, e.g. apache-2.0, mit, "
                          "cc-by-4.0 or other")
    speed = options.speed_seconds
    if speed is None or not math.isfinite(speed) or speed < 0:
        raise ConfigError(f"--speed-seconds {speed}: give a number of seconds >= 0 (0 skips the speed figure)")
    return resolve_device(options.device)


def check_outdir(outdir: Path, force: bool) -> None:
    cwd = Path.cwd().resolve()
    if outdir.resolve() == cwd or outdir.resolve() in cwd.parents:
        raise UserError(f"{outdir}: is the current folder or holds it, and the export renames OUTDIR into place; "
                        "name a folder below it, e.g. exported/")
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"{outdir}: exists and is not a folder; pick another OUTDIR")
    if outdir.is_dir() and any(outdir.iterdir()) and not force:
        raise UserError(f"{outdir}: not empty; pick an empty or new OUTDIR, or pass --force to replace it "
                        "(files an export does not write are kept)")


def check_speed_seconds(seconds: float, state: dict) -> None:
    from s3prl_ekd.core.frames import parse_conv_layers, receptive_field

    shortest = receptive_field(parse_conv_layers(state["student"]["config"]["conv_feature_layers"])) / SAMPLE_RATE
    if 0 < seconds < shortest:
        raise ConfigError(f"--speed-seconds {seconds:g}: shorter than the student's CNN window ({shortest:g} s); "
                          "give 0 (no speed figure) or more")


# --- writing ---------------------------------------------------------------------------------------

def is_export_output(name: str) -> bool:
    """A top-level name that some export (any format, any version) writes."""
    return name in (*SUPERB_FILES, *TRANSFORMERS_FILES, *CARD_FILES) or bool(_VENDORED_PACKAGE.fullmatch(name))


def build_beside(outdir: Path, force: bool, build: Callable[[Path], ExportReport]) -> ExportReport:
    """Run `build(folder)` on a new folder beside `outdir`, then rename it to `outdir`.

    On any failure the new folder is removed and `outdir` is untouched. With `force` a non-empty
    `outdir` is replaced only once the new folder is complete; its entries that no export writes
    (notes, a .git folder) are moved into the new one.
    """
    outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = outdir.parent / f".{outdir.name}.export-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        report = build(staging)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if out_of_space(error, outdir.parent):
            raise UserError(f"{outdir.parent}: no space left on the device while exporting; nothing was written "
                            "or replaced; free some space and run again") from error
        raise
    if outdir.is_dir() and any(outdir.iterdir()):
        old = outdir.parent / f".{outdir.name}.replaced-{os.getpid()}"
        keep = [p.name for p in outdir.iterdir() if not is_export_output(p.name) and not (staging / p.name).exists()]
        os.rename(outdir, old)
        os.rename(staging, outdir)
        for name in keep:
            os.rename(old / name, outdir / name)
        shutil.rmtree(old)
    else:
        os.replace(staging, outdir)  # a new name, or an empty folder
    report.outdir = outdir
    report.files = folder_sizes(outdir, only=report.files)
    return report


def out_of_space(error: BaseException, folder: Path) -> bool:
    """ENOSPC / EDQUOT, or a library's write error that wraps it (safetensors names it in its message;
    torch's writer raises a RuntimeError that does not, so then: the device has almost no room left)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(error, Exception) and "No space left on device" in str(error):
        return True
    return isinstance(error, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < 16 * 2**20


def folder_sizes(folder: Path, only: dict[str, int] | None = None) -> dict[str, int]:
    """Top-level entry -> bytes (folders: the sum of their files), sorted by name."""
    sizes = {}
    for entry in sorted(folder.iterdir()):
        if only is not None and entry.name not in only:
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name] = sum(p.stat().st_size for p in files)
    return sizes


def write_superb(folder: Path, state: dict, extra: dict, options: ExportOptions, device: str) -> ExportReport:
    import torch

    from s3prl_ekd.core.student import student_from_dict
    from s3prl_ekd.upstream.ekd_distiller.expert import UpstreamExpert

    package = vendored_package_name()
    write_vendored_package(folder, package)
    (folder / "expert.py").write_text(expert_shim(package))
    torch.save({**state, **extra}, folder / MODEL_FILE)
    (folder / "requirements.txt").write_text(requirements())
    upstream = UpstreamExpert(str(folder / MODEL_FILE))  # also proves the written model.pt loads
    speed = (measure_speed(upstream, lambda model, wav: model([wav]), options.speed_seconds, device)
             if options.speed_seconds else None)
    parameters = count_parameters(student_from_dict(state["student"]))  # the upstream holds heads only when asked
    return ExportReport(folder, "superb", state["step"], parameters, speed,
                        upstream.hidden_state_names, upstream.get_downsample_rates("hidden_states"), package=package)


ROUND_TRIP_TOLERANCE = 1e-4  # float32 on CPU gives 0 to ~1e-6; more means the conversion is wrong


def write_transformers(folder: Path, state: dict, options: ExportOptions, device: str) -> ExportReport:
    import torch
    from transformers import AutoFeatureExtractor, AutoModel

    from s3prl_ekd.core.student import student_from_dict
    from s3prl_ekd.tools import hf_export

    hf_export.build_hubert(state["student"]).save_pretrained(folder, safe_serialization=True)
    hf_export.feature_extractor().save_pretrained(folder)
    if options.with_heads:
        from safetensors.torch import save_file

        tensors, metadata = hf_export.heads_tensors(state)
        save_file(tensors, str(folder / HEADS_FILE), metadata=metadata)
    # What the folder loads is checked against the student it came from.
    model = AutoModel.from_pretrained(folder).eval()
    AutoFeatureExtractor.from_pretrained(folder)
    student = student_from_dict(state["student"])
    parameters = count_parameters(student)
    student.drop_heads().eval()
    probe = torch.randn(max(SAMPLE_RATE, 2 * student.receptive_field), generator=torch.Generator().manual_seed(0))
    differences = hf_export.round_trip_differences(student, model, probe)
    names = ["cnn"] + [f"layer{i + 1}" for i in range(student.config.encoder_layers)]
    worst = max(range(len(differences)), key=differences.__getitem__)
    if differences[worst] > ROUND_TRIP_TOLERANCE:
        raise UserError(f"the exported HubertModel differs from the student by {differences[worst]:.2e} at hidden "
                        f"state {names[worst]}; nothing was written; please report this with the checkpoint's config")
    speed = (measure_speed(model, lambda m, wav: m(wav[None]), options.speed_seconds, device)
             if options.speed_seconds else None)
    return ExportReport(folder, "transformers", state["step"], parameters, speed, names, student.downsample_rate,
                        model_parameters=sum(p.numel() for p in model.parameters()), round_trip=differences,
                        heads_written=options.with_heads)


def export(ckpt: str | Path, outdir: str | Path, options: ExportOptions | None = None) -> ExportReport:
    """Write the `options.format` folder for `ckpt` into `outdir` (see the module docstring).

    Refuses, before writing anything: an unknown format or device, a bad speed length, a checkpoint
    that is not a student, a non-empty `outdir` without `force`, a student the format cannot hold,
    superb results of another checkpoint.
    """
    options = options or ExportOptions()
    outdir = Path(outdir)
    device = check_options(options)
    check_outdir(outdir, options.force)
    raw = load_raw(ckpt)
    state = model_dict(raw, ckpt)
    check_speed_seconds(options.speed_seconds, state)
    if options.format == "transformers":
        from s3prl_ekd.tools.hf_export import hubert_config_kwargs

        hubert_config_kwargs(state["student"]["config"])  # refuses a student HubertModel cannot hold
    results = read_superb_results(options.superb_results, ckpt) if options.superb_results else None
    fingerprints = teacher_fingerprints(raw, state)
    training = runner_config(raw, state)
    extra = {"runner_config": training} if training and is_plain(training) else {}
    if any(f.source == "checkpoint" for f in fingerprints):
        extra["teacher_fingerprints"] = [f.sha256 for f in fingerprints]

    def build(folder: Path) -> ExportReport:
        report = (write_superb(folder, state, extra, options, device) if options.format == "superb"
                  else write_transformers(folder, state, options, device))
        (folder / "README.md").write_text(model_card(state, report, CardInputs(options.license, fingerprints,
                                                                                 training, results)))
        (folder / ".gitattributes").write_text(gitattributes())
        # safetensors creates its files readable by their owner only; every file gets the mode the
        # umask gave the card
        mode = (folder / "README.md").stat().st_mode & 0o777
        for path in folder.rglob("*"):
            if path.is_file():
                path.chmod(mode)
        report.files = folder_sizes(folder)
        return report

    return build_beside(outdir, options.force, build)


def gitattributes() -> str:
    return "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)


# --- the model card --------------------------------------------------------------------------------

@dataclass
class CardInputs:
    license: str
    fingerprints: list[TeacherFingerprint]
    runner_config: dict
    superb_results: dict | None


def card_metadata(state: dict, report: ExportReport, card: CardInputs) -> dict:
    """The YAML block the hub reads."""
    datarc = (card.runner_config.get("pretrain_expert") or {}).get("datarc") or {}
    tags = ["audio", "speech", "self-supervised-learning", "knowledge-distillation", "distilhubert",
            "s3prl", "s3prl-ekd", state["aggregation"].replace("_", "-")]
    if report.format == "transformers":
        metadata = {"library_name": "transformers", "pipeline_tag": "feature-extraction", "license": card.license,
                    "tags": ["hubert", *tags]}
    else:  # the tags of SUPERB's hidden-set submissions
        metadata = {"license": card.license, "tags": ["library:s3prl", "benchmark:superb", "type:upstream", *tags]}
    datasets = known_datasets(datarc)
    if datasets:
        metadata["datasets"] = datasets
    return metadata


def shorten(value):
    """A path-like string as its last part (a card is public; the rest names the user's machine)."""
    if isinstance(value, str) and os.sep in value.rstrip(os.sep):
        return ".../" + Path(value).name
    if isinstance(value, list):
        return [shorten(v) for v in value]
    return value


def training_lines(state: dict, card: CardInputs) -> list[str]:
    runner = card.runner_config.get("runner") or {}
    datarc = (card.runner_config.get("pretrain_expert") or {}).get("datarc") or {}
    total = runner.get("total_steps")
    lines = [f"- steps: {state['step']:,}" + (f" of the run's {total:,}" if isinstance(total, int) else "")]
    if datarc:
        batch, crop = datarc.get("train_batch_size"), datarc.get("sequence_length")
        if batch and crop:
            lines.append(f"- batches: {batch} utterances, cropped to {crop / SAMPLE_RATE:g} s")
        shown = {k: shorten(v) for k, v in datarc.items()
                 if k not in ("num_workers", "train_batch_size", "sequence_length")}
        lines.append("- data (the runner config's datarc; local paths shortened to their last part): "
                     + ", ".join(f"`{k}: {v}`" for k, v in shown.items()))
    else:
        lines.append("- data: not recorded in the checkpoint")
    optimizer = card.runner_config.get("optimizer") or {}
    if optimizer.get("lr") is not None:
        lines.append(f"- optimizer: {optimizer.get('name', '?')}, learning rate {optimizer['lr']}")
    return lines


def results_lines(results: dict) -> list[str]:
    arrow = {"per": "lower is better", "wer": "lower is better", "acc": "higher is better"}
    lines = ["## Downstream results", "",
             f"`s3prl-ekd superb` (s3prl's run_downstream.py, frozen upstream, weighted sum of the hidden states), "
             f"profile `{results.get('profile', '?')}`:", "",
             "| task | metric (test, %) | value |", "|---|---|---|"]
    for task, metrics in results["tasks"].items():
        for metric, value in metrics.items():
            shown = f"{value:.2f}" if isinstance(value, (int, float)) else str(value)
            lines.append(f"| {task} | {metric} ({arrow.get(metric, '')}) | {shown} |")
    return lines + [""]


def model_card(state: dict, report: ExportReport, card: CardInputs) -> str:
    import yaml

    config = state["student"]["config"]
    marks = {"checkpoint": "", "file": " *", "unknown": ""}
    teacher_rows = "\n".join(
        f"| {k} | {t['name']} | `{f.sha256}`{marks[f.source]} | {t['layers']} | {t['weight']:g} | {t['dim'] or '?'} |"
        for k, (t, f) in enumerate(zip(state["teachers"], card.fingerprints)))
    hashed_note = ("\n\n\\* sha256 of the teacher file the model config names, hashed at export: the checkpoint does "
                   "not record it" if any(f.source == "file" for f in card.fingerprints) else "")
    p, s = report.parameters, report.speed
    speed = (f"{s.seconds * 1000:.1f} ms per {s.audio_seconds:g} s utterance on {s.device} "
             f"(real-time factor {s.real_time_factor:.4f})" if s else "not measured")
    student_lines = [
        f"- CNN: `{config['conv_feature_layers']}` (extractor_mode: {config['extractor_mode']}), "
        f"downsample rate {report.downsample_rate} samples",
        f"- transformer: {config['encoder_layers']} layers x {config['encoder_embed_dim']} dims, "
        f"{config['encoder_attention_heads']} heads, FFN {config['encoder_ffn_embed_dim']}",
        f"- parameters: **{p.total:,}** ({p.total / 1e6:.2f} M) = backbone {p.backbone:,} + prediction heads {p.heads:,}",
    ]
    if report.format == "transformers":
        student_lines.append(f"- this folder's HubertModel: {report.model_parameters:,} parameters"
                             + identity_note(report.model_parameters - p.backbone))
    student_lines.append(f"- inference speed: {speed}")
    body = [
        "---", yaml.safe_dump(card_metadata(state, report, card), sort_keys=False).rstrip(), "---", "",
        "# EKD student (ensemble knowledge distillation)", "",
        "A DistilHuBERT-style student distilled from an ensemble of self-supervised speech models with",
        f"s3prl-ekd {__version__} (s3prl pretraining task `ekd_distiller`), exported from pretraining step "
        f"{state['step']:,}" + (" as a transformers `HubertModel`." if report.format == "transformers"
                                else " as a SUPERB hidden-set upstream."), "",
        "## Teachers and aggregation", "",
        f"Aggregation: **{state['aggregation']}**", "",
        "| # | teacher | checkpoint sha256 | predicted layers | weight | hidden size |",
        "|---|---------|-------------------|------------------|--------|-------------|",
        teacher_rows + hashed_note, "",
        "## Training", "", *training_lines(state, card), "",
        "## Student", "", *student_lines, "",
        *(transformers_sections(state, report) if report.format == "transformers" else superb_sections(report)),
        *(results_lines(card.superb_results) if card.superb_results else []),
        "## License", "",
        f"`{card.license}`, chosen at export (s3prl-ekd's own license, Apache-2.0, unless `--license` was given). "
        "The weights were learnt from the teachers and the training data above: check their terms too.", "",
    ]
    return "\n".join(body)


def transformers_sections(state: dict, report: ExportReport) -> list[str]:
    from s3prl_ekd.tools.hf_export import padded_batch_note

    n = state["student"]["config"]["encoder_layers"]
    diffs = ", ".join(f"{name} {d:.1e}" for name, d in zip(report.hidden_states, report.round_trip))
    heads = (f"`{HEADS_FILE}` holds them (safetensors; its metadata names each head set's teachers and layers)."
             if report.heads_written else
             f"They are not in this folder (`s3prl-ekd export --format transformers --with-heads` writes them to "
             f"`{HEADS_FILE}`).")
    return [
        "## Hidden states", "",
        f"s3prl-ekd's hidden states are `cnn` (the projected CNN output, before the positional convolution) and "
        f"`layer1`..`layer{n}`. In transformers:", "",
        "| s3prl-ekd | HubertModel |", "|---|---|",
        "| `cnn` | `model.feature_projection(model.feature_extractor(input_values).transpose(1, 2))` |",
        *(f"| `layer{i}` | `hidden_states[{i}]` |" for i in range(1, n + 1)),
        "| (none) | `hidden_states[0]`: the encoder input after the positional convolution and layer norm |", "",
        f"At export, the largest difference to the student on one utterance was: {diffs}.", "",
        padded_batch_note(state["student"]["config"]["extractor_mode"]), "",
        "## How to load", "",
        "```python",
        "from transformers import AutoFeatureExtractor, AutoModel",
        'extractor = AutoFeatureExtractor.from_pretrained("path/or/hub-id")',
        'model = AutoModel.from_pretrained("path/or/hub-id").eval()',
        "inputs = extractor([wav_16khz], sampling_rate=16000, return_tensors=\"pt\")  # 1-D float arrays",
        f"layers = model(**inputs, output_hidden_states=True).hidden_states[1:]  # layer1..layer{n}",
        "```", "",
        "The feature extractor passes raw waveforms (`do_normalize: false`: the student was trained on them).", "",
        "## Prediction heads", "",
        f"The prediction heads used in distillation ({report.parameters.heads:,} parameters) are not part of "
        f"`HubertModel`. {heads}", "",
    ]


def superb_sections(report: ExportReport) -> list[str]:
    return [
        "## Hidden states", "",
        f"By default the upstream returns {len(report.hidden_states)} hidden states ({', '.join(report.hidden_states)}):",
        "the CNN output after the input projection and every transformer layer (the EKD paper's choice).",
        "A `-g` YAML (or keyword) `hidden_states: heads` selects the prediction heads instead, and",
        "`hidden_states: backbone+heads` both; s3prl's Featurizer sums them, so this works only where the",
        "selected states share one size.", "",
        "## How to load", "",
        "SUPERB hidden-set style (s3prl 0.4.18, this folder as the Hugging Face repo):", "",
        "```",
        "python run_downstream.py --hub huggingface -u <org>/<this-repo> -d <task> -c <config.yaml> -n <name>",
        "```", "",
        "Or with this folder on `sys.path`:", "",
        "```python",
        'import sys; sys.path.append("path/to/this/folder")',
        "from expert import UpstreamExpert",
        'upstream = UpstreamExpert(ckpt="path/to/this/folder/model.pt").eval()',
        'hidden_states = upstream([wav_16khz_1d_tensor])["hidden_states"]   # list of (1, frames, dim)',
        "```", "",
        f"The code the upstream needs is in `{report.package}/`, a package named after the s3prl-ekd version and "
        "its content, so an installed s3prl-ekd of another version cannot take its place. Requirements: see "
        "`requirements.txt`. `model.pt` holds tensors and plain Python values only "
        "(`torch.load(..., weights_only=True)` reads it).", "",
    ]


# --- command line ----------------------------------------------------------------------------------

def register_cli(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a student as a SUPERB submission folder (default) or a "
                              "transformers HubertModel folder, each with a model card for a model hub")
    p.add_argument("ckpt", help="states-*.ckpt of `s3prl-ekd pretrain` (or a model.pt)")
    p.add_argument("outdir", help="folder to write; must be empty or new unless --force")
    p.add_argument("--format", choices=FORMATS, default="superb",
                   help="superb: expert.py + model.pt for s3prl's run_downstream.py --hub huggingface; "
                        "transformers: config.json + model.safetensors for AutoModel.from_pretrained (default: superb)")
    p.add_argument("--with-heads", action="store_true",
                   help=f"transformers: also write the prediction heads to {HEADS_FILE}")
    p.add_argument("--license", default=DEFAULT_LICENSE,
                   help=f"license id for the model card (default: {DEFAULT_LICENSE}, s3prl-ekd's own)")
    p.add_argument("--superb-results", metavar="RESULTS_JSON",
                   help="results.json of `s3prl-ekd superb` on this checkpoint: a table in the model card")
    p.add_argument("--force", action="store_true",
                   help="replace a non-empty OUTDIR once the new folder is complete (files an export does not "
                        "write are kept)")
    p.add_argument("--speed-seconds", type=float, default=10.0,
                   help="audio length for the inference-speed figure (0 skips it; default 10)")
    p.add_argument("--device", help="device for the speed figure (default: cuda if available, else cpu)")

    def _export(args) -> int:
        options = ExportOptions(args.format, args.force, args.speed_seconds, args.device, args.with_heads,
                                args.license, args.superb_results)
        print(export(args.ckpt, args.outdir, options).summary())
        return 0

    p.set_defaults(func=_export)
