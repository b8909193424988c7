"""One exception family for everything attnres_fx refuses to do."""

from __future__ import annotations


class AttnResError(Exception):
    """A model that cannot be transformed, or a transformed model used in a way it does not support.

    Every message says what was found, where (module path), why it is refused and what to do.
    """


class CaptureError(AttnResError):
    """torch.export could not capture the model with the given inputs."""


class NoResidualStreamError(AttnResError):
    """The graph holds no pre-norm residual chain to rewrite."""


class UnnormalizedReadError(AttnResError):
    """The stream is read without a norm, so zero-init would change the model's function."""


class AlreadyTransformedError(AttnResError):
    """The model (or one of its submodules) has already been transformed."""


class UnfollowableStreamError(AttnResError):
    """The stream does not run through module calls that hooks can follow (see `layers.py`)."""
