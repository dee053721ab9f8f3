"""One exception type per kind of mistake a user can make; the CLI prints them in one line."""


class GlmcpuError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ModelFileError(GlmcpuError):
    """The file is missing, not a GGUF, truncated or corrupt."""


class UnsupportedArchitecture(GlmcpuError):
    """A GGUF of a model family glmcpu does not run."""


class UnsupportedTensorType(GlmcpuError):
    """A tensor stored in a ggml type the kernels do not handle (yet)."""


class ContextOverflow(GlmcpuError):
    """The prompt (plus what is asked to be generated) does not fit the context."""


class ConvertError(GlmcpuError):
    """A checkpoint the converter cannot turn into a GGUF."""


class ModelNotFound(ModelFileError):
    """A model name that is no file, no downloaded model and no catalogue entry (or one not pulled yet)."""


class HubError(GlmcpuError):
    """The Hugging Face Hub cannot be reached, or has no such repository or file."""


class DownloadInterrupted(GlmcpuError):
    """A download stopped part way; the part is kept and the next `glmcpu pull` resumes it."""


class NotEnoughDiskSpace(GlmcpuError):
    """The models directory's disk cannot hold the download."""


class ChecksumMismatch(GlmcpuError):
    """A downloaded file whose sha256 differs from the one the hub publishes."""


class QuantizeError(GlmcpuError):
    """A GGUF that cannot be re-quantised as asked (already quantised, unknown type)."""
