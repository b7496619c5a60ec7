"""Custom ops and their plain-PyTorch implementations (Triton kernels plug in here)."""
from . import ops  # noqa: F401  (registers torch.ops.adakv.*)
from . import static  # noqa: F401  (registers the static-cache ops)
from . import gemv  # noqa: F401  (registers adakv::gemv)
from . import ttir_memo

# Where our triton_ops are registered, so any compile that traces them (through adakv_backend or not) gets
# the memo of torch's per-launch TTIR analysis (start time; kernels/ttir_memo.py). Idempotent, never raises.
ttir_memo.install()
