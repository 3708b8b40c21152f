"""s3prl-ekd: ensemble knowledge distillation of self-supervised speech models, as an s3prl plugin.

The package is laid out by layer, each importing only from the ones before it:
`errors`, `stack`, `devices`, `patches` -> `io` (files, audio, configs, checkpoints) -> `core` (the
method) -> `plugin` (s3prl's runners, hub and datasets) -> `recipes`, `demo`, `tools` -> `cli`.

Importing it costs nothing: the start-up hook (`_startup.py`) runs in every interpreter of the
environment. `core` and `plugin` check, when first imported, that s3prl can run here (`stack.py`).
"""

__version__ = "0.2.0"


def load_student(path):
    """The EKD student of a `states-*.ckpt` or exported `model.pt` (read with weights_only=True)."""
    from s3prl_ekd.core.student import student_from_dict
    from s3prl_ekd.io.checkpoint import read_checkpoint

    return student_from_dict(read_checkpoint(path)["student"])
