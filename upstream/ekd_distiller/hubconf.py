"""`s3prl.hub` entries of the EKD student (added to `s3prl.hub` by s3prl_ekd.plugin.hub).

`ckpt` is a pretraining checkpoint (`states-*.ckpt` of `s3prl-ekd pretrain -u ekd_distiller`)
or a `model.pt` written by `s3prl-ekd export`; `model_config` (`-g`) is an optional YAML of
upstream options (see expert.py, e.g. `hidden_states: backbone+heads`).
"""

from __future__ import annotations

import os

from s3prl_ekd.errors import CheckpointError

from .expert import UpstreamExpert as _UpstreamExpert

__all__ = ["ekd_distiller", "ekd_distiller_local", "ekd_distiller_url"]


def ekd_distiller_local(ckpt, model_config=None, *args, **kwargs):
    """An EKD student from a local states-*.ckpt or model.pt (PATH)."""
    if ckpt is None or not os.path.isfile(ckpt):
        raise CheckpointError(f"ekd_distiller: checkpoint {ckpt} not found; pass -k PATH to a states-*.ckpt "
                              "from `s3prl-ekd pretrain` or a model.pt from `s3prl-ekd export`")
    return _UpstreamExpert(ckpt, model_config, *args, **kwargs)


def ekd_distiller_url(ckpt, model_config=None, refresh=False, *args, **kwargs):
    """An EKD student from a URL, downloaded once into s3prl's cache (again with refresh=True)."""
    from s3prl.util.download import _urls_to_filepaths

    return ekd_distiller_local(_urls_to_filepaths(ckpt, refresh=refresh), model_config, *args, **kwargs)


def ekd_distiller(ckpt=None, model_config=None, refresh=False, *args, **kwargs):
    """An EKD student from a local path or an http(s) URL (`-u ekd_distiller -k CKPT`)."""
    if ckpt is None:
        raise CheckpointError("ekd_distiller needs a checkpoint: pass -k (or ckpt=/path_or_url=) with a "
                              "states-*.ckpt from `s3prl-ekd pretrain` or a model.pt from `s3prl-ekd export`")
    if str(ckpt).startswith(("http://", "https://")):
        return ekd_distiller_url(ckpt, model_config, refresh, *args, **kwargs)
    return ekd_distiller_local(ckpt, model_config, *args, **kwargs)
