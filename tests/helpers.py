"""Helpers shared by the test files: the loss-function harness, tiny random-init models, preference batches.

Import them from here (``from tests.helpers import ...``), never from another test file.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from agent_code.liger_kernel.chunked_loss import LigerFusedLinearSimPOFunction
from agent_code.liger_kernel.chunked_loss.reference import reference_simpo
from agent_code.liger_kernel.chunked_loss.simpo_loss import AUX_OUTPUT_NAMES
from patches import SimPOCausalLMOutputWithPast
from tests.distributed.fsdp2_setup import global_batch

# ---------------------------------------------------------------------------------------------------------------
# the fused loss against its references: inputs, one forward + backward, comparisons
# ---------------------------------------------------------------------------------------------------------------

F32_TOL = dict(atol=1e-5, rtol=5e-4)
BF16_TOL = dict(atol=5e-2, rtol=5e-1)


def triton_interpreter_marks():
    """pytest marks of a test that runs Triton kernels looping over a run-time bound under ``TRITON_INTERPRET=1``:
    skipped without triton, and below 3.9, whose interpreter cannot run such loops (e.g. a GPU image's 3.6, where
    the compiled kernels run instead)."""
    try:
        import triton
    except ImportError:
        return [pytest.mark.skip(reason="triton is not installed")]
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    return [pytest.mark.skipif(version < (3, 9),
                               reason="this triton's interpreter cannot loop over a run-time bound (needs >= 3.9)")]


def interpreter_report(module: str) -> dict:
    """The JSON report ``python -m <module>`` prints as its last line, run in a fresh interpreter process under
    ``TRITON_INTERPRET=1`` (read when a kernel is decorated: the real kernels of a GPU session stay untouched)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", module], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def use_environment_setting(monkeypatch, module, name: str, env_var: str, env) -> None:
    """``module.<name>`` unset (None), so the environment variable ``env_var`` decides: set to ``env``, or removed
    when ``env`` is None."""
    monkeypatch.setattr(module, name, None)
    if env is None:
        monkeypatch.delenv(env_var, raising=False)
    else:
        monkeypatch.setenv(env_var, env)


def make_inputs(n_pairs, seq_len, hidden, vocab, dtype, bias=True, ignore_index=-100, seed=0, ignore_frac=0.3):
    """Fresh random inputs (never zeros), with a share of ignored target positions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n_pairs, seq_len, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    target = torch.randint(0, vocab, (2 * n_pairs, seq_len), generator=gen)
    target[torch.rand(target.shape, generator=gen) < ignore_frac] = ignore_index
    target[:, 0] = torch.randint(0, vocab, (2 * n_pairs,), generator=gen)  # every row keeps a token
    if 0 <= ignore_index < vocab:  # make sure a positive ignore_index never sneaks in as a real token
        target[:, 0] = torch.where(target[:, 0] == ignore_index, (ignore_index + 1) % vocab, target[:, 0])
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(x), cast(w), target, cast(b)


def forward_backward(fn, x, w, target, b, upstream, **kwargs):
    """Run ``fn`` and backprop ``upstream * loss``; return loss, aux and grads (detached)."""
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    loss, aux = fn(x, w, target, b, **kwargs)
    (loss * upstream).backward()
    grads = tuple(None if t is None or t.grad is None else t.grad.detach().clone() for t in (x, w, b))
    return loss.detach(), aux, grads


def ours(x, w, target, b, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0, compute_nll_loss=False,
         gamma=0.5, chunk_size=1, softcap=None, compiled=True):
    """The fused Function under test, with the Function's defaults as keyword arguments."""
    return LigerFusedLinearSimPOFunction.apply(
        x, w, target, b, ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled, gamma, chunk_size,
        softcap,
    )


def truth(x, w, target, b, chunk_size=None, compiled=None, **kwargs):
    """The reference from full logits computed in float64 (``chunk_size`` and ``compiled`` accepted, unused)."""
    return reference_simpo(x, w, target, b, compute_dtype=torch.float64, **kwargs)


def plain(x, w, target, b, chunk_size=None, compiled=None, **kwargs):
    """Plain PyTorch: the same reference computed in the inputs' dtype."""
    return reference_simpo(x, w, target, b, compute_dtype=None, **kwargs)


def assert_all_close(actual, expected, what, **tol):
    """Loss, every statistic and every gradient of two :func:`forward_backward` results agree within ``tol``."""
    loss_a, aux_a, grads_a = actual
    loss_e, aux_e, grads_e = expected
    torch.testing.assert_close(loss_a.double(), loss_e.double(), **tol, msg=lambda m: f"{what} loss: {m}")
    for name, a, e in zip(AUX_OUTPUT_NAMES, aux_a, aux_e):
        assert a.shape == e.shape, f"{what} {name}: shape {a.shape} != {e.shape}"
        torch.testing.assert_close(a.double(), e.double(), **tol, msg=lambda m, n=name: f"{what} {n}: {m}")
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), grads_a, grads_e):
        if e is None:
            assert a is None, f"{what} {name} should be None"
            continue
        torch.testing.assert_close(a.double(), e.double(), **tol, msg=lambda m, n=name: f"{what} {n}: {m}")


def relative_error(a, ref):
    """``‖a − ref‖ / ‖ref‖`` in float64."""
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30)).item()


class MatmulCounter(TorchDispatchMode):
    """Counts the matrix products dispatched while active."""

    # "matmul" reaches the mode undecomposed under inference_mode (no autograd key to decompose it at)
    MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "_scaled_mm", "matmul"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.MATMULS:
            self.count += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------------------------
# tiny random-init models and preference batches
# ---------------------------------------------------------------------------------------------------------------


def random_llama(seed=0, dtype=None, **config):
    """Random-init ``LlamaForCausalLM(LlamaConfig(**config))`` drawn after ``torch.manual_seed(seed)``, cast to
    ``dtype`` if given: the same weights for the same arguments."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    return model if dtype is None else model.to(dtype)


#: vocabulary of the models of :func:`build_tiny_model` and the batches of :func:`make_preference_batch`
VOCAB = 97
_TINY_CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # Larger than HF's 0.02 so the logits spread over several units: a wrong head or softcap shows.
    initializer_range=0.2,
)


def build_tiny_model(model_type, dtype=torch.float64, seed=0, **config_overrides):
    """Random-init ``AutoModelForCausalLM`` of ``model_type`` (eval mode, ``dtype``)."""
    config = AutoConfig.for_model(model_type, **{**_TINY_CONFIG, **config_overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def make_preference_batch(n_pairs=3, seq_len=11, seed=1):
    """Random ``(input_ids, attention_mask, labels)`` of ``2 * n_pairs`` rows: chosen rows, then rejected.

    Each row has its own prompt length (1 to 3 tokens, labels -100) and right padding (0 to 3 positions, mask 0,
    labels -100).
    """
    batch = global_batch(n_pairs, seq_len, VOCAB, seed=seed, max_prompt_length=3, max_padding=3)
    return batch["input_ids"], batch["attention_mask"], batch["labels"]


def preference_sequences(pairs, seed=0, vocab=VOCAB):
    """(prompt ids, answer ids) of the 2B sequences of ``pairs`` ``[(prompt, chosen, rejected) lengths]``: the chosen
    ones, then the rejected ones. Prompts start with BOS (id 1); the other ids are random, drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(3, vocab, (n,), generator=generator).tolist()  # noqa: E731
    prompts = [[1, *draw(p - 1)] for p, _, _ in pairs]
    chosen = [draw(c) for _, c, _ in pairs]
    rejected = [draw(r) for _, _, r in pairs]
    return [(p, a) for p, a in zip(prompts, chosen)] + [(p, a) for p, a in zip(prompts, rejected)]


def padded_and_packed(seqs):
    """The sequences ``seqs`` (:func:`preference_sequences`) as the padded batch and as the packed one, both
    through ``PreferenceCollator``'s own code (right padding; one row with ``position_ids`` restarting at 0)."""
    from patches.collator import PreferenceCollator

    rows = [prompt + answer for prompt, answer in seqs]
    label_rows = [[-100] * len(prompt) + answer for prompt, answer in seqs]
    width = max(map(len, rows))
    padded = dict(input_ids=torch.tensor([r + [0] * (width - len(r)) for r in rows]),
                  attention_mask=torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
                  labels=torch.tensor([r + [-100] * (width - len(r)) for r in label_rows]))
    collator = PreferenceCollator.__new__(PreferenceCollator)  # packed() reads label_pad_token_id alone
    collator.label_pad_token_id = -100
    return padded, collator.packed(rows, label_rows)


# ---------------------------------------------------------------------------------------------------------------
# patched models: output and gradients
# ---------------------------------------------------------------------------------------------------------------


def parameter_grads(model):
    """``{name: grad clone}`` of every trainable parameter (tied ones once); asserts each received a gradient."""
    grads = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None, f"{name} received no gradient"
            grads[name] = parameter.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return grads


def simpo_output_and_grads(model, batch):
    """A patched model's output on ``batch`` ``(input_ids, attention_mask, labels)``, after the backward of its
    loss, and the gradients (:func:`parameter_grads`, which clears them)."""
    input_ids, attention_mask, labels = batch
    output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert isinstance(output, SimPOCausalLMOutputWithPast)
    output.loss.backward()
    return output, parameter_grads(model)
