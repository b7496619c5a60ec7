"""Custom ops and their plain-PyTorch implementations (Triton kernels plug in here)."""
from . import ops  # noqa: F401  (registers torch.ops.adakv.*)
from . import static  # noqa: F401  (registers the static-cache ops)
from . import gemv  # noqa: F401  (registers adakv::gemv)
