"""Every Python block of README.md and docs/*.md runs as written, from the repository root, so the docs cannot rot.

A block runs in a fresh namespace that holds the names a README snippet may leave to the reader (``DOC_NAMES``):
a tiny random-init Llama ``model`` with a preference batch (``input_ids``, ``attention_mask``, ``labels``), and an
LM head ``lm_head`` with ``hidden`` states and an aligned ``target``. A block that cannot run here (it needs a GPU,
torchrun, a checkpoint on disk, or is a signature listing) is preceded by ``<!-- not-run: <why> -->``; it must
still compile, and the reason must say why.
"""
import re
from pathlib import Path

import pytest
import torch

from tests.distributed import fsdp2_setup
from tests.helpers import random_llama

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
#: a ```python (or ```py) block, with the not-run marker on the line right before it, if any
BLOCK = re.compile(
    r"^(?:<!-- not-run: (?P<reason>.*?) -->\n)?```(?:python|py)[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M
)
NOT_RUN_MARKER = re.compile(r"<!--\s*not-run")
DOC_NAMES = ("model", "input_ids", "attention_mask", "labels", "lm_head", "hidden", "target")


def _blocks():
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code")) + 1
            block_id = f"{document.relative_to(REPO_ROOT)}:{line}"
            blocks.append(pytest.param(document, line, match["code"], match["reason"], id=block_id))
    return blocks


BLOCKS = _blocks()


def doc_namespace():
    """The names a documentation block may use without defining them (``DOC_NAMES``), freshly built."""
    model = random_llama(0, **fsdp2_setup.TINY_LLAMA)
    batch = fsdp2_setup.global_batch(n_pairs=2, seq_len=12, vocab_size=fsdp2_setup.TINY_LLAMA["vocab_size"])
    rows, length, hidden_size = 4, 9, 24
    lm_head = torch.nn.Linear(hidden_size, fsdp2_setup.TINY_LLAMA["vocab_size"])
    target = torch.randint(0, lm_head.out_features, (rows, length))
    target[:, :3] = -100  # the prompt
    namespace = dict(model=model, lm_head=lm_head, target=target,
                     hidden=torch.randn(rows, length, hidden_size, requires_grad=True), **batch)
    assert set(namespace) == set(DOC_NAMES)
    return namespace


def test_every_document_is_scanned_and_has_blocks():
    assert {document.name for document in DOCUMENTS} >= {"README.md", "usage.md", "interface.md"}
    assert len({param.values[0] for param in BLOCKS}) >= 5, "fewer documents with Python blocks than expected"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda document: document.name)
def test_not_run_markers_sit_right_before_a_python_block(document):
    """A marker elsewhere (a blank line in between, another language) would silently exempt nothing."""
    text = document.read_text()
    markers = len(NOT_RUN_MARKER.findall(text))
    marked_blocks = sum(1 for match in BLOCK.finditer(text) if match["reason"] is not None)
    assert markers == marked_blocks, f"{document.name}: {markers} not-run markers, {marked_blocks} on a python block"


@pytest.mark.parametrize("document, line, code, reason", BLOCKS)
def test_documentation_block_runs(document, line, code, reason, monkeypatch):
    compiled = compile(code, f"{document}:{line}", "exec")  # every block, run or not, is valid Python
    if reason is not None:
        assert len(reason.split()) >= 2, f"{document.name}:{line}: say why the block cannot run, not {reason!r}"
        return
    monkeypatch.chdir(REPO_ROOT)
    exec(compiled, {"__name__": "__doc_block__", **doc_namespace()})
