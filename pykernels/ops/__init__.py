"""torch.library operators. Importing this package registers every op of every available backend."""
from . import attention, cross_entropy  # noqa: F401
from . import linear_cross_entropy  # noqa: F401
from . import lstm  # noqa: F401
