"""Variable-length attention of packed batches (patches/varlen.py): no mask, no compilation per length.

The patched forward runs a packed batch of a model on sdpa or flex_attention (or on ``packed_varlen`` by name)
sequence by sequence: FlashAttention's varlen kernel on CUDA, per-sequence attention elsewhere. Both are checked
against the padded batch (loss, log-probs, rewards, every parameter gradient); the kernel's layout, boundaries,
GQA, scale and window are checked on the CPU with a reference that has the kernel's exact contract.
"""
import types

import pytest
import torch

from patches import apply_fused_simpo, varlen, varlen_kernel
from tests.helpers import padded_and_packed, parameter_grads, preference_sequences

OPTIONS = dict(beta=2.5, gamma=0.7, alpha=0.6, label_smoothing=0.15, compute_nll_loss=True)
F32 = dict(rtol=5e-4, atol=2e-5)
#: (prompt, chosen, rejected) lengths: ragged, an empty rejected answer, a length-1 sequence (BOS, empty answer)
PAIRS = [(3, 6, 2), (1, 7, 4), (4, 3, 0), (2, 1, 6), (1, 0, 3)]
#: the tiny configs (4 query heads, 2 key/value heads: GQA) with sliding windows shorter than the sequences, and
#: Gemma-2's attention softcap (small enough to matter) and query scale
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=3),
    "qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "gemma2": dict(sliding_window=3, attn_logit_softcapping=1.0, query_pre_attn_scalar=5,
                   final_logit_softcapping=3.0),
}
#: transformers' sdpa leaves Gemma-2's attention softcap out; eager applies it, as the packed path does
PADDED_REFERENCE = {"gemma2": "eager"}
STATISTICS = ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "nll_loss")


def run(model, batch):
    output = model(**batch)
    output.loss.backward()
    return output, parameter_grads(model)


def assert_same_training(actual, expected, tolerance=F32):
    (output, grads), (expected_output, expected_grads) = actual, expected
    for name in STATISTICS:
        torch.testing.assert_close(getattr(output, name), getattr(expected_output, name), **tolerance, msg=name)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], **tolerance, msg=lambda m: f"grad of {name}: {m}")


def padded_then_packed(model, padded, packed, packed_implementation="sdpa"):
    """The padded batch on the reference implementation, then the packed one on ``packed_implementation``."""
    model.config._attn_implementation = PADDED_REFERENCE.get(model.config.model_type, "sdpa")
    expected = run(model, padded)
    model.config._attn_implementation = packed_implementation
    return run(model, packed), expected


def spy(monkeypatch, name, module=None):
    """Count the calls of ``<module>.<name>`` (``patches.varlen`` by default; still running it)."""
    module = varlen if module is None else module
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_packed_batch_runs_per_sequence_and_trains_as_the_padded_one(model_type, tiny_model, monkeypatch):
    model = tiny_model(model_type, dtype=torch.float32, **FAMILIES[model_type])
    model.gradient_checkpointing_enable()
    model.train()  # no dropout in these configs
    apply_fused_simpo(model, **OPTIONS, chunk_size=2)
    padded, packed = padded_and_packed(preference_sequences(PAIRS, seed=len(model_type)))
    calls = spy(monkeypatch, "packed_attention")
    actual, expected = padded_then_packed(model, padded, packed)
    assert len(calls) == 2 * model.config.num_hidden_layers  # each layer, then its recomputation in backward
    assert actual[0].rejected_logps[2] == 0  # the empty answer
    assert_same_training(actual, expected)


class NoSquareTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op output whose last two dimensions are both ``n`` (an ``(N, N)`` mask or score matrix)."""

    def __init__(self, n):
        super().__init__()
        self.n, self.found = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-2:] == (self.n, self.n):
                self.found.append(f"{func}: {tuple(tensor.shape)}")
        return out


@pytest.mark.parametrize("implementation", ["sdpa", varlen.ATTENTION_NAME])
def test_no_mask_or_score_matrix_spans_the_packed_row(implementation, tiny_model):
    """A long pair must train with memory linear in N: nothing of shape (N, N), forward or backward."""
    model = apply_fused_simpo(tiny_model("mistral", dtype=torch.float32, attn_implementation=implementation))
    model.gradient_checkpointing_enable()
    model.train()
    _, packed = padded_and_packed(preference_sequences([(5, 40, 31)], seed=1))
    n_tokens = packed["input_ids"].shape[1]
    with NoSquareTensors(n_tokens) as mode:
        model(**packed).loss.backward()
    assert mode.found == []


def test_flex_attention_packed_batches_never_compile(tiny_model, monkeypatch):
    """flex_attention compiles a kernel per packed length: packed batches take the variable-length path instead."""
    model = apply_fused_simpo(tiny_model("llama", dtype=torch.float32, attn_implementation="flex_attention"),
                              **OPTIONS)
    assert model.config._attn_implementation == "flex_attention"
    varlen.install_dispatch()
    routed = varlen._attention_registry()["flex_attention"]

    def compiled_flex(*args, **kwargs):
        raise AssertionError("transformers' flex_attention ran (and compiled) for a packed batch")

    monkeypatch.setattr(routed, "original", compiled_flex)
    monkeypatch.setattr(varlen._mask_registry()["flex_attention"], "original", compiled_flex)
    for seed, pairs in enumerate((PAIRS, PAIRS[:3], [(2, 9, 1)])):  # a new packed length each step
        padded, packed = padded_and_packed(preference_sequences(pairs, seed=seed))
        actual, expected = padded_then_packed(model, padded, packed, packed_implementation="flex_attention")
        assert_same_training(actual, expected)


def test_calls_outside_a_packed_forward_are_unchanged(tiny_model, monkeypatch):
    """The no-label forward and generate() of a model on sdpa: the same results with and without the dispatch."""
    model = apply_fused_simpo(tiny_model("qwen2", dtype=torch.float32, **FAMILIES["qwen2"]))
    padded, packed = padded_and_packed(preference_sequences(PAIRS, seed=4))
    inputs = [dict(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False),
              dict(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"])]
    prompt = packed["input_ids"][:, :4]

    def outputs():
        with torch.no_grad():
            return ([model(**batch).logits for batch in inputs],
                    model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0))

    varlen.install_dispatch()
    logits, tokens = outputs()
    for kind, registry in (("attention", varlen._attention_registry()), ("mask", varlen._mask_registry())):
        for name in varlen.ROUTED_IMPLEMENTATIONS:
            monkeypatch.setitem(registry, name, registry[name].original)
    expected_logits, expected_tokens = outputs()
    for actual, expected in zip(logits, expected_logits):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_with_the_dispatch_installed(backend, tiny_model, preference_batch):
    """A compiled patched model, padded and packed batches, once transformers' sdpa entry is wrapped."""
    varlen.install_dispatch()
    torch._dynamo.reset()
    model = apply_fused_simpo(tiny_model("llama", dtype=torch.float32, num_hidden_layers=1), **OPTIONS)
    input_ids, attention_mask, labels = preference_batch(seed=12)
    padded = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    _, packed = padded_and_packed(preference_sequences(PAIRS, seed=12))
    compiled = torch.compile(model, backend=backend)
    try:
        for batch in (padded, packed, padded):
            torch.testing.assert_close(compiled(**batch).loss, model(**batch).loss, **F32)
    finally:
        torch._dynamo.reset()


def test_by_name_the_same_model_without_labels(tiny_model, monkeypatch):
    """``attn_implementation="packed_varlen"``: packed rows without a mask (the sequences read from position_ids
    once per forward), padding masks and generation through sdpa, all as the model on sdpa computes them."""
    reference = tiny_model("mistral", dtype=torch.float32, **FAMILIES["mistral"])
    model = tiny_model("mistral", dtype=torch.float32, attn_implementation=varlen.ATTENTION_NAME,
                       **FAMILIES["mistral"])
    assert model.config._attn_implementation == varlen.ATTENTION_NAME
    seqs = preference_sequences(PAIRS, seed=5)
    padded, packed = padded_and_packed(seqs)
    attention_calls = spy(monkeypatch, "packed_attention")
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        assert len(attention_calls) == model.config.num_hidden_layers
        padded_logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        assert len(attention_calls) == model.config.num_hidden_layers  # padding: sdpa
        torch.testing.assert_close(
            padded_logits,
            reference(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, rtol=0, atol=0)
        prompt = packed["input_ids"][:, :5]
        assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0),
                           reference.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0))
    start = 0
    for row, (prompt, answer) in enumerate(seqs):
        n = len(prompt) + len(answer)
        torch.testing.assert_close(packed_logits[0, start:start + n], padded_logits[row, :n], **F32)
        start += n


def test_by_name_reads_the_sequences_once_per_forward(tiny_model, monkeypatch):
    model = tiny_model("llama", dtype=torch.float32, attn_implementation=varlen.ATTENTION_NAME)
    _, packed = padded_and_packed(preference_sequences(PAIRS, seed=6))
    reads = []
    original = varlen.PackedSequences.from_position_ids.__func__
    monkeypatch.setattr(varlen.PackedSequences, "from_position_ids",
                        classmethod(lambda cls, *a: reads.append(a) or original(cls, *a)))
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=packed["input_ids"], position_ids=packed["position_ids"].clone())
    assert len(reads) == 2  # one per forward, not one per layer


def test_patched_forward_by_name_trains_as_the_padded_batch(tiny_model):
    model = apply_fused_simpo(tiny_model("qwen2", dtype=torch.float32, **FAMILIES["qwen2"]), **OPTIONS)
    padded, packed = padded_and_packed(preference_sequences(PAIRS, seed=7))
    actual, expected = padded_then_packed(model, padded, packed, packed_implementation=varlen.ATTENTION_NAME)
    assert_same_training(actual, expected)


def test_sliding_window_follows_transformers_convention():
    """transformers' sliding window W lets a query see W keys counting itself; FlashAttention's left window is W - 1."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    n = 9
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    for window in range(1, n + 2):
        zero = torch.tensor(0)
        expected = sliding_window_causal_mask_function(window)(zero, zero, q, k).expand(n, n)
        left, right = varlen.window_size(window, True, n)
        ours = varlen_kernel.window_mask(n, (left, right), "cpu")
        ours = (k <= q) if ours is None else ours  # None: plain causal
        assert torch.equal(ours, expected), window
        assert (left, right) == ((-1, 0) if window >= n else (window - 1, 0))


def test_sequences_from_position_ids():
    positions = torch.tensor([[0, 1, 2, 0, 1, 5, 6, 0], [0, 1, 2, 3, 0, 1, 2, 3]])
    sequences = varlen.PackedSequences.from_position_ids(positions, 2, 8, "cpu")
    assert sequences.offsets == (0, 3, 5, 7, 8, 12, 16)  # a row always starts a sequence
    assert sequences.cu_seqlens.dtype == torch.int32 and sequences.cu_seqlens.tolist() == list(sequences.offsets)
    assert sequences.max_length == 4
    assert varlen.PackedSequences.from_position_ids(None, 2, 5, "cpu").offsets == (0, 5, 10)


# ---------------------------------------------------------------------------------------------------------------
# the CUDA kernel's contract, on the CPU
# ---------------------------------------------------------------------------------------------------------------


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                          window_size=(-1, -1), enable_gqa=False):
    """``torch.nn.attention.varlen.varlen_attn`` (torch 2.13) as documented, sequence by sequence in float32.

    Also asserts what the CUDA kernel needs from its caller: ``(T, H, D)`` tensors with a unit last stride, int32
    ``cu_seq`` on the tensors' device covering every token, exact Python-int maxima and a tuple ``window_size``
    (varlen_attn tests ``window_size == (-1, 0)``). The window ``(left, right)`` keeps key j for query i when
    ``i - left <= j <= i + right`` (-1: unbounded), queries aligned to the end of the keys.
    """
    assert query.dim() == key.dim() == value.dim() == 3 and all(t.stride(-1) == 1 for t in (query, key, value))
    for cu, tensor, maximum in ((cu_seq_q, query, max_q), (cu_seq_k, key, max_k)):
        assert cu.dtype == torch.int32 and cu.device == tensor.device and cu.dim() == 1
        assert cu[0] == 0 and cu[-1] == tensor.shape[0]
        assert type(maximum) is int and maximum == int(cu.diff().max())
    assert isinstance(window_size, tuple) and len(window_size) == 2 and return_aux is None
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads and not enable_gqa:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={heads} and "
                         f"Hkv={kv_heads}. Try setting enable_gqa=True for GQA.")
    assert heads % kv_heads == 0
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    left, right = window_size
    outputs = []
    bounds = zip(cu_seq_q.tolist(), cu_seq_q.tolist()[1:], cu_seq_k.tolist(), cu_seq_k.tolist()[1:])
    for q_start, q_end, k_start, k_end in bounds:
        q = query[q_start:q_end].float()
        k, v = (t[k_start:k_end].float().repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        i = torch.arange(q.shape[0], device=q.device)[:, None] + (k.shape[0] - q.shape[0])
        j = torch.arange(k.shape[0], device=q.device)[None, :]
        keep = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool, device=q.device)
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
        weights = scores.masked_fill(~keep, float("-inf")).softmax(-1)
        outputs.append(torch.einsum("hqk,khd->qhd", weights, v).to(query.dtype))
    return torch.cat(outputs)


def reference_varlen_attn_is_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                                    return_aux=None):
    """An older varlen_attn: ``is_causal`` only (no window, scale or GQA)."""
    return reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                                 window_size=(-1, 0) if is_causal else (-1, -1))


KERNELS = {"window_size": reference_varlen_attn, "is_causal": reference_varlen_attn_is_causal}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_kernel_path_with_a_reference_kernel(model_type, kernel, tiny_model, monkeypatch):
    """The CUDA path's layout, boundaries, GQA, scale and window, with the kernel replaced by its reference."""
    monkeypatch.setattr(varlen_kernel, "KERNEL", KERNELS[kernel])
    monkeypatch.setattr(varlen_kernel, "_device_unsupported", lambda query: None)  # the CPU stands in for CUDA
    model = tiny_model(model_type, dtype=torch.float32, **FAMILIES[model_type])
    model.gradient_checkpointing_enable()
    model.train()
    apply_fused_simpo(model, **OPTIONS)
    padded, packed = padded_and_packed(preference_sequences(PAIRS, seed=8 + len(model_type)))
    kernel_calls = spy(monkeypatch, "_call_kernel", varlen_kernel)
    actual, expected = padded_then_packed(model, padded, packed)
    assert_same_training(actual, expected)
    # which layers the kernel served: Gemma-2's softcap never; a window shorter than the sequences only where
    # the kernel takes window_size (Mistral: both layers sliding; Qwen2: layer 1; Gemma-2: layer 0)
    sliding = {"mistral": 2, "qwen2": 1, "gemma2": 1}.get(model_type, 0)
    served = 0 if model_type == "gemma2" else 2 - (sliding if kernel == "is_causal" else 0)
    assert len(kernel_calls) == 2 * served  # forward and recomputation
    offsets = torch.cumsum(torch.tensor([0, *(len(p) + len(a) for p, a in preference_sequences(PAIRS))]), 0)
    for query, _, _, sequences, *_ in kernel_calls:
        assert query.shape[0] == packed["input_ids"].shape[1]
        assert list(sequences.offsets) == offsets.tolist()


def test_kernel_reasons(monkeypatch):
    """What the kernel cannot serve goes the per-sequence way, for a reason the CUDA warning names."""
    query, window = torch.zeros(5, 4, 8), (-1, 0)
    monkeypatch.setattr(varlen_kernel, "KERNEL", None)
    assert "has no torch.nn.attention.varlen" in varlen_kernel.kernel_unsupported(query, query, query, window, None, 0.0)
    monkeypatch.setattr(varlen_kernel, "KERNEL", reference_varlen_attn)
    reasons = {"softcapping": (window, 50.0, 0.0), "dropout": (window, None, 0.1),
               "CUDA only": (window, None, 0.0)}
    for expected, arguments in reasons.items():
        assert expected in varlen_kernel.kernel_unsupported(query, query, query, *arguments)
    assert "head dimensions" in varlen_kernel.kernel_unsupported(query, query, query[..., :4], window, None, 0.0)
    monkeypatch.setattr(varlen_kernel, "KERNEL", reference_varlen_attn_is_causal)
    assert "no window_size" in varlen_kernel.kernel_unsupported(query, query, query, (2, 0), None, 0.0)
    assert "CUDA only" in varlen_kernel.kernel_unsupported(query, query, query, window, None, 0.0)
    monkeypatch.setattr(varlen_kernel, "KERNEL", lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: query)
    assert "neither window_size nor is_causal" in varlen_kernel.kernel_unsupported(query, query, query, window, None, 0.0)
    if torch.cuda.is_available():
        assert "float32" in varlen_kernel._device_unsupported(query.cuda())


def test_attention_dropout_runs_per_sequence_with_dropout(tiny_model, monkeypatch):
    monkeypatch.setattr(varlen_kernel, "KERNEL", reference_varlen_attn)
    monkeypatch.setattr(varlen_kernel, "_device_unsupported", lambda query: None)
    model = apply_fused_simpo(tiny_model("llama", dtype=torch.float32, attention_dropout=0.5))
    _, packed = padded_and_packed(preference_sequences(PAIRS, seed=9))
    kernel_calls = spy(monkeypatch, "_call_kernel", varlen_kernel)
    with torch.no_grad():
        evaluated = model(**packed).loss
        assert len(kernel_calls) == 2  # eval: no dropout, the kernel serves both layers
        model.train()
        trained = [model(**packed).loss for _ in range(2)]
    assert len(kernel_calls) == 2  # training: the kernel has no dropout
    assert evaluated != trained[0] != trained[1]


def test_attention_that_cannot_be_served_is_refused_naming_the_model(tiny_model):
    model = apply_fused_simpo(tiny_model("llama", dtype=torch.float32))
    _, packed = padded_and_packed(preference_sequences(PAIRS, seed=10))
    for layer in model.model.layers:  # an attention that does not pass its keyword arguments on
        forward = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, _f=forward, **k: _f(*a, **{n: v for n, v in k.items()
                                                                       if n != varlen.SEQUENCES_KWARG})
    with pytest.raises(varlen.UnservedAttentionError,
                       match="LlamaForCausalLM.*attn_implementation='sdpa'.*LlamaAttention.*'eager'"):
        model(**packed)

    flex = apply_fused_simpo(tiny_model("llama", dtype=torch.float32, attn_implementation="flex_attention"))
    decoder = flex.get_decoder()
    decoder.forward = types.MethodType(lambda self, input_ids=None, position_ids=None, use_cache=None: None, decoder)
    with pytest.raises(ValueError, match="LlamaModel.forward takes no \\*\\*kwargs.*'flash_attention_2'"):
        flex(**packed)


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the real kernel
# ---------------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("window", [(-1, 0), (5, 0)])
def test_cuda_kernel_matches_its_reference(window):
    """The reference above is the real varlen_attn: forward and gradients, GQA, a custom scale, a window."""
    if varlen_kernel.KERNEL is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    lengths = [1, 17, 64, 3, 130]
    total, heads, kv_heads, dim = sum(lengths), 8, 2, 64
    sequences = varlen.PackedSequences.from_offsets(torch.tensor([0, *lengths]).cumsum(0).tolist(), "cuda")
    tensors = [torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (heads, kv_heads, kv_heads)]
    upstream = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16)
    if window[0] >= 0 and "window_size" not in varlen_kernel.kernel_parameters(varlen_kernel.KERNEL):
        pytest.skip("this torch's varlen_attn has no window_size")
    results = []
    for kernel in (lambda *t: varlen_kernel._call_kernel(*t, sequences, 0.3, window),
                   lambda *t: reference_varlen_attn(*t, sequences.cu_seqlens, sequences.cu_seqlens,
                                                    sequences.max_length, sequences.max_length, scale=0.3,
                                                    window_size=window, enable_gqa=True)):
        out = kernel(*tensors)
        grads = torch.autograd.grad(out, tensors, upstream)
        results.append((out, *grads))
    (out, *grads), (expected_out, *expected_grads) = results
    torch.testing.assert_close(out.float(), expected_out.float(), rtol=2e-2, atol=2e-2)
    for name, grad, expected in zip(("query", "key", "value"), grads, expected_grads):  # bf16 backward
        torch.testing.assert_close(grad.float(), expected.float(), rtol=5e-2, atol=5e-2, msg=name)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_packed_equals_padded_on_cuda_through_varlen(model_type, dtype, tiny_model, monkeypatch):
    """bf16: FlashAttention's varlen kernel; float32 (which it does not take): the per-sequence path."""
    model = tiny_model(model_type, dtype=dtype, hidden_size=128, head_dim=32, **FAMILIES[model_type]).cuda()
    model.gradient_checkpointing_enable()
    model.train()
    apply_fused_simpo(model, **OPTIONS)
    padded, packed = padded_and_packed(preference_sequences(PAIRS, seed=11))
    kernel_calls = spy(monkeypatch, "_call_kernel", varlen_kernel)
    actual, expected = padded_then_packed(model, {k: v.cuda() for k, v in padded.items()},
                                          {k: v.cuda() for k, v in packed.items()})
    if dtype == torch.float32 or varlen_kernel.KERNEL is None:
        assert kernel_calls == []
    else:  # every layer, forward and recomputation, but sliding layers with a kernel that has no window_size
        windows = "window_size" in varlen_kernel.kernel_parameters(varlen_kernel.KERNEL)
        served = 2 if windows else {"llama": 2, "mistral": 0, "qwen2": 1}[model_type]
        assert len(kernel_calls) == 2 * served
    tolerance = F32 if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    if dtype == torch.float32:
        assert_same_training(actual, expected, tolerance)
        return
    (output, grads), (expected_output, expected_grads) = actual, expected
    for name in STATISTICS:
        torch.testing.assert_close(getattr(output, name).float(), getattr(expected_output, name).float(),
                                   **tolerance, msg=name)
    for name, grad in grads.items():  # bf16: relative error of each gradient as a whole
        error = (grad.float() - expected_grads[name].float()).norm() / expected_grads[name].float().norm()
        assert error < 0.1, f"grad of {name}: relative error {error:.3g}"  # a mixed sequence: O(1)
