"""The per-chunk logit operations of the fused loss, in two interchangeable implementations.

:class:`EagerLogitOps` (here) is plain PyTorch (the CPU path, ``compiled=False`` and float64).
``triton_logit_ops.TritonLogitOps`` is the CUDA fast path: cuBLAS GEMMs plus two Triton kernels, so a chunk's
logits are written once by the GEMM, read once for the row statistics and read/written once more when they are
turned into their gradient in place (that module imports triton, so :func:`select_logit_ops` imports it only
when the fast path is chosen).
Both honour one contract: whatever ``logits(x2d)`` returns is what ``statistics`` and ``gradient_`` consume.
The eager row statistics and in-place gradient (:func:`logit_statistics`, :func:`logit_gradient_`) are the
readable references of the two Triton kernels, and the CPU path.
"""
import functools
from typing import Optional, Tuple

import torch

from agent_code.liger_kernel.utils import accumulation_dtype

LOW_PRECISION = (torch.bfloat16, torch.float16)

#: Fast path, bf16/fp16 inputs: dtype of the logits the GEMM writes (None: the input dtype, as plain PyTorch
#: does; torch.float32: unrounded, twice the bytes to move and store). Statistics are float32 either way.
FAST_PATH_LOGITS_DTYPE: Optional[torch.dtype] = None


# --- the eager references of the two kernels of triton_logit_ops ----------------------------------------------


def apply_softcap_(logits: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    """In place ``logits = softcap * tanh(logits / softcap)`` (Gemma-2/3's final_logit_softcapping)."""
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def logit_statistics(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row statistics of ``logits`` (N, V) for targets ``target`` (N,).

    Returns float tensors of shape (N,):
      * ``lse``          = ``logits.logsumexp(-1)``
      * ``target_logit`` = ``logits.gather(-1, target)`` (0 where ``target == ignore_index``)
      * ``logit_sum``    = ``logits.sum(-1)``  (every row, ignored ones included: feeds the logits mean)
    so that ``log_softmax(logits)[n, target[n]] == target_logit[n] - lse[n]``.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(valid, target_logit, torch.zeros_like(target_logit))
    return lse, target_logit, logits.sum(dim=-1)


def logit_gradient_(
    logits: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    coef: torch.Tensor,
    ignore_index: int,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Overwrite ``logits`` (N, V) with ``dL/dlogits``.

    For a loss whose dependence on token n is ``-coef[n] * log_softmax(logits[n])[target[n]]`` this is
    ``coef[n] * (softmax(logits[n]) - onehot(target[n]))``; ``coef`` must already be 0 on ignored tokens.
    With ``softcap`` the stored logits are the capped ones ``c = s * tanh(raw / s)`` and the result is
    chained through ``dc/draw = 1 - (c / s) ** 2``, giving the gradient w.r.t. the raw (pre-cap) logits.
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    if softcap is not None:
        cap_derivative = 1.0 - (logits / softcap) ** 2
    logits.sub_(lse.unsqueeze(-1)).exp_()
    # onehot: subtract 1 at the target column of valid rows only
    logits.scatter_add_(-1, safe_target.unsqueeze(-1), -valid.to(logits.dtype).unsqueeze(-1))
    logits.mul_(coef.unsqueeze(-1))
    if softcap is not None:
        logits.mul_(cap_derivative)
    return logits


def chunk_logits(x2d: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``(x2d @ weight.T + bias)`` as a fresh float32 (float64 for float64 inputs) tensor."""
    stat_dtype = accumulation_dtype(x2d.dtype)
    if x2d.dtype in LOW_PRECISION and x2d.is_cuda:
        # cuBLAS accumulates in fp32 anyway; keeping its fp32 output avoids rounding logits to 8 bits.
        logits = torch.mm(x2d, weight.t(), out_dtype=torch.float32)
    else:
        logits = (x2d @ weight.t()).to(stat_dtype)
    if bias is not None:
        logits += bias.to(stat_dtype)
    return logits


def matmul_accumulation_dtype(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` in float32 (float64) without rounding through a low-precision output; written into ``out``
    (a contiguous tensor of that dtype) when given."""
    out_dtype = accumulation_dtype(a.dtype)
    if a.dtype in LOW_PRECISION and a.is_cuda:
        return torch.mm(a, b, out_dtype=out_dtype) if out is None else torch.mm(a, b, out_dtype=out_dtype, out=out)
    product = (a @ b).to(out_dtype)
    return product if out is None else out.copy_(product)


def accumulate_weight_grad_(acc: torch.Tensor, grad_logits: torch.Tensor, x2d: torch.Tensor,
                            acc_scale: float = 1.0, product_scale: float = 1.0) -> None:
    """``acc = acc_scale * acc + product_scale * grad_logits.T @ x2d`` with ``acc`` in float32 (float64) whatever
    the operand dtype (the scales are the GEMM's beta and alpha: no extra pass over ``acc``)."""
    if grad_logits.dtype == acc.dtype:
        acc.addmm_(grad_logits.t(), x2d, beta=acc_scale, alpha=product_scale)
    elif acc.is_cuda:
        # fp32 accumulation inside cuBLAS and in place: no (V, H) temporary, no extra pass over acc
        torch.addmm(acc, grad_logits.t(), x2d, beta=acc_scale, alpha=product_scale, out_dtype=acc.dtype, out=acc)
    else:
        if acc_scale != 1.0:
            acc.mul_(acc_scale)
        acc.add_((grad_logits.t() @ x2d).to(acc.dtype), alpha=product_scale)


class EagerLogitOps:
    """Plain PyTorch: float32 (float64) logits, softcap applied in place, gradients kept in float32 (float64)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], softcap: Optional[float],
                 ignore_index: int):
        self.dtype = weight.dtype
        self.acc_dtype = accumulation_dtype(self.dtype)
        # CUDA: bf16/fp16 operands with float32 outputs (tensor cores). CPU: low-precision GEMMs are no faster
        # there and round their outputs, so operands go to float32 once and only the final results are rounded.
        self.gemm_dtype = self.acc_dtype if (self.dtype in LOW_PRECISION and not weight.is_cuda) else self.dtype
        self.weight = weight.to(self.gemm_dtype)
        self.bias = bias
        self.softcap = softcap
        self.ignore_index = ignore_index

    @property
    def logits_element_size(self) -> int:
        return torch.empty((), dtype=self.acc_dtype).element_size()

    @property
    def grad_input_dtype(self) -> torch.dtype:
        # dX stays in the accumulation dtype until backward scales it, so bf16 results are rounded once
        return self.acc_dtype

    def prepare_input(self, x2d: torch.Tensor) -> torch.Tensor:
        return x2d.to(self.gemm_dtype)

    def logits(self, x2d: torch.Tensor) -> torch.Tensor:
        return apply_softcap_(chunk_logits(x2d, self.weight, self.bias), self.softcap)

    def statistics(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return logit_statistics(logits, target, self.ignore_index)

    def gradient_(self, logits, lse, target, coef) -> torch.Tensor:
        return logit_gradient_(logits, lse, target, coef, self.ignore_index, self.softcap).to(self.gemm_dtype)

    #: whether the opt-in gradient filter is on (:meth:`kept_blocks`); never on this path
    filters_gradient = False

    def kept_blocks(self, grad_logits: torch.Tensor, coef: torch.Tensor):
        """The blocks of ``grad_logits`` the gradient filter keeps (``coef``: its rows' factors), or None: the
        products run dense and exact (always here; see :class:`TritonLogitOps`)."""
        return None

    def input_grad(self, grad_logits: torch.Tensor, blocks=None) -> torch.Tensor:
        return matmul_accumulation_dtype(grad_logits, self.weight)

    #: False: a pair chunk holds exactly ``chunk_size`` pairs (the CPU path's cost does not depend on chunk size)
    chunk_size_is_minimum = False
    #: False: the host reads the device's facts at once (bad target ids must be rejected before ``gather`` reads
    #: them)
    host_reads_async = False

    def accumulate_weight_grad(self, acc: Optional[torch.Tensor], grad_logits: torch.Tensor, x2d: torch.Tensor,
                               n_products: int, acc_scale: float = 1.0, product_scale: float = 1.0,
                               blocks=None) -> torch.Tensor:
        """``acc = acc_scale * acc + product_scale * grad_logits.T @ x2d``, creating ``acc`` on the first of the
        call's ``n_products`` products (the scales apply to a later product only); ``blocks``
        (:meth:`kept_blocks`): only those blocks of ``grad_logits`` are contracted."""
        if acc is None:
            acc = torch.zeros(self.weight.shape, dtype=self.acc_dtype, device=self.weight.device)
        accumulate_weight_grad_(acc, grad_logits, x2d, acc_scale, product_scale)
        return acc

    def finish_weight_grad(self, grad_weight: torch.Tensor) -> torch.Tensor:
        return grad_weight


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton imports (it ships with CUDA builds of torch; CPU machines may lack it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_logit_ops(_input, weight, bias, softcap, ignore_index, allow_triton: bool,
                     weight_grad_in_input_dtype: bool = False, gradient_filter_eps: Optional[float] = None
                     ) -> EagerLogitOps:
    """Fast path for CUDA bf16/fp16/fp32 inputs when ``allow_triton`` (the public ``compiled``) and triton imports;
    plain PyTorch otherwise (which ignores ``weight_grad_in_input_dtype`` and ``gradient_filter_eps``)."""
    fast = (
        allow_triton
        and _input.is_cuda
        and _input.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and triton_available()
    )
    if fast:
        from agent_code.liger_kernel.chunked_loss.triton_logit_ops import TritonLogitOps

        return TritonLogitOps(weight, bias, softcap, ignore_index, weight_grad_in_input_dtype, gradient_filter_eps)
    return EagerLogitOps(weight, bias, softcap, ignore_index)
