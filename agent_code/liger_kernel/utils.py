"""Small helpers shared across the package."""
import torch


def infer_device() -> str:
    """Return ``"cuda"`` when a CUDA device is usable, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for softmax statistics and accumulators: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
