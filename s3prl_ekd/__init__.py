"""s3prl-ekd: ensemble knowledge distillation of self-supervised speech models, as an s3prl plugin.

The package is laid out by layer, each importing only from the ones before it:
`io` (files, audio, configs, checkpoints) -> `core` (the method) -> `plugin` (s3prl's runners,
hub and datasets) -> `recipes`, `demo`, `tools` -> `cli`.

Kept import-light (no torch): a start-up hook imports `s3prl_ekd.plugin.hub` in every
interpreter of the environment to register the `ekd_distiller` upstream.
"""

from s3prl_ekd.stack import require_stack

__version__ = "0.2.0"

# An ImportError whose message names the stack to install, instead of an error deep inside s3prl.
require_stack()


def load_student(path):
    """The EKD student of a `states-*.ckpt` or exported `model.pt` (read with weights_only=True)."""
    from s3prl_ekd.core.student import student_from_dict
    from s3prl_ekd.io.checkpoint import read_checkpoint

    return student_from_dict(read_checkpoint(path)["student"])
