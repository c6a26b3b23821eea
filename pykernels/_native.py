"""torch's own functions, as they were when pykernels was imported. The paths that hand a call to torch's kernel
(backends.prefer_native) call these: ``pykernels.patch_functional`` rebinds the names in torch.nn.functional to
pykernels' functions, and through them those paths would call back into pykernels."""
import torch.nn.functional as _F

cross_entropy = _F.cross_entropy
scaled_dot_product_attention = _F.scaled_dot_product_attention
linear_cross_entropy = getattr(_F, "linear_cross_entropy", None)  # torch >= 2.13
