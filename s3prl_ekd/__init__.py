"""s3prl-ekd: ensemble knowledge distillation of self-supervised speech models.

Kept import-light (no torch) because a startup hook imports it in every
interpreter of the environment to register the `ekd_distiller` upstream.
"""

__version__ = "0.1.0"
