"""Argument errors. torch raises RuntimeError for most invalid arguments of the calls pykernels replaces (shapes,
sizes, dtypes, devices), so a caller's ``except RuntimeError`` must keep working after a drop-in swap; Python's
convention (and pykernels' messages, which name the argument) call them ValueError / TypeError. These are both."""

__all__ = ["ArgumentValueError", "ArgumentTypeError", "ArgumentDtypeError", "ArgumentAssertionError"]


class ArgumentValueError(ValueError, RuntimeError):
    """An argument of the right type with a wrong value, shape, size or device."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype."""


class ArgumentDtypeError(ArgumentTypeError, NotImplementedError):
    """A tensor of a dtype the call has no kernel for (integer logits): torch's kernels raise NotImplementedError
    ('"log_softmax_lastdim_kernel_impl" not implemented for 'Long''), which this is too."""


class ArgumentAssertionError(ArgumentValueError, AssertionError):
    """An argument that torch's own call checks with ``assert`` (torch.nn.MultiheadAttention's shapes): raised as
    what torch raises, too, so a drop-in keeps the caller's ``except AssertionError``."""
