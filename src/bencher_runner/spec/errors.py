"""The one exception hierarchy.

Every failure that ends a job is a :class:`RunnerError` whose message is the text a user sees: what
failed, with which value, and what to do. The CLI prints ``str(error)`` (never a traceback) and the
daemon puts it in the ``failed`` message's ``error`` field.
"""


class RunnerError(Exception):
    """Base of every error the runner reports to a user."""


class SpecError(RunnerError):
    """A job or command line asks for something invalid (bad value, missing command, ...)."""


class ImageError(RunnerError):
    """The image cannot be read: missing, malformed, wrong digest, hostile content."""


class DigestMismatchError(ImageError):
    """A blob's bytes do not hash to the digest that names it."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{what}: digest mismatch: expected {expected}, got {actual}; "
            "the blob is corrupt or was tampered with; pull or build the image again"
        )
        self.expected = expected
        self.actual = actual


class UnsafeImageError(ImageError):
    """A layer tries to write, link or delete outside the root tree, or holds a forbidden entry."""


class RootfsError(RunnerError):
    """The root filesystem image cannot be built (disk too small, mkfs failure)."""


class SandboxError(RunnerError):
    """The VM cannot be set up, started, or did not report a result."""


class KernelBundleError(SandboxError):
    """The guest kernel bundle (kernel + modules) is missing or incomplete."""


class AgentError(SandboxError):
    """The guest agent failed inside the VM before or while starting the command."""


class GuestPanicError(SandboxError):
    """The guest kernel panicked."""


class GuestOutOfMemoryError(SandboxError):
    """The guest's OOM killer killed the benchmark."""


class JobTimeoutError(RunnerError):
    """The job ran past its timeout and was stopped (named so as not to shadow the builtin)."""


class CanceledError(RunnerError):
    """The job was canceled (by the server or by the user)."""
