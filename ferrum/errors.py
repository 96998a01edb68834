"""Exceptions ferrum raises besides ValueError and TypeError."""


class CudaError(RuntimeError):
    """A CUDA call failed; the message is CUDA's own."""
