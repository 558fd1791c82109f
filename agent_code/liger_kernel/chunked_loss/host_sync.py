"""What the host needs from the device, fetched with as little waiting as possible."""
import torch

from agent_code.liger_kernel.chunked_loss.input_checks import raise_for_target_values


class HostCopy:
    """A small device tensor copied to the host; with ``asynchronous`` (CUDA) queued without waiting.

    The copy goes to pinned memory behind an event, so the host reads it (:meth:`get`) only when it needs the
    values, by which time the device has usually long passed that point of its queue.
    """

    def __init__(self, values: torch.Tensor, asynchronous: bool):
        self._ready = None
        if asynchronous and values.is_cuda:
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = values.cpu()

    def get(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
            self._ready = None
        return self._host


class HostChecks:
    """The device-side facts the host loop needs, fetched in one copy: bad target ids, pairs with tokens.

    With ``asynchronous`` (CUDA fast path) the copy is queued without waiting, so the first chunk's GEMM and kernels
    are already running when the host first needs the answer (its kernels clamp bad ids, so nothing reads
    out of bounds before the error is raised). Otherwise the answer is fetched, and checked, at once.
    Few launches, as they delay the first GEMM: the smallest and largest non-ignored id and the per-row token
    counts travel together; the host compares them with [0, V) and pairs them up itself.
    """

    def __init__(self, target, ignore_index, vocab, n_pairs, asynchronous: bool, token_counts=None):
        """``token_counts``: the (2B,) per-row counts when ``target`` is not ``(2B, T)`` (a packed batch's)."""
        self._target, self._ignore_index, self._vocab, self._n_pairs = target, ignore_index, vocab, n_pairs
        valid = target != ignore_index
        self.token_counts = valid.sum(dim=1) if token_counts is None else token_counts  # (2B,) on the device
        if target.numel():
            id_range = [bound.view(1) for bound in torch.where(valid, target, 0).aminmax()]
        else:
            id_range = [torch.zeros(2, dtype=target.dtype, device=target.device)]
        self._copy = HostCopy(torch.cat((*id_range, self.token_counts.to(target.dtype))), asynchronous)
        self._pairs_with_tokens = None
        if not asynchronous:
            self.checked_pairs_with_tokens()

    def checked_pairs_with_tokens(self) -> torch.Tensor:
        """Host bool tensor (B,): both rows of pair i have at least one non-ignored token.

        Waits for the device's answer on first use and raises ``ValueError`` there for a target id outside
        [0, V) that is not ``ignore_index``.
        """
        if self._pairs_with_tokens is None:
            host = self._copy.get()
            if int(host[0]) < 0 or int(host[1]) >= self._vocab:
                raise_for_target_values(self._target, self._ignore_index, self._vocab)
            counts = host[2:]
            self._pairs_with_tokens = (counts[: self._n_pairs] > 0) & (counts[self._n_pairs :] > 0)
        return self._pairs_with_tokens
