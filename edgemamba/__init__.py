"""edgemamba: compile Mamba state-space language models for constrained devices."""

__version__ = "0.1.0"

from edgemamba.errors import EdgeMambaError  # noqa: E402
from edgemamba.spec import ModelSpec  # noqa: E402
from edgemamba.checkpoint import Checkpoint, load_checkpoint  # noqa: E402


def __getattr__(name):
    # Session pulls in onnxruntime: import it only when asked for.
    if name == "Session":
        from edgemamba.session import Session

        return Session
    raise AttributeError(name)


__all__ = ["__version__", "EdgeMambaError", "ModelSpec", "Checkpoint", "load_checkpoint", "Session"]
