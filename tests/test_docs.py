"""Every Python block of README.md and docs/**/*.md runs as written, from the repository root, so the docs cannot rot;
every relative link among them resolves (the file, and the heading an ``#anchor`` names); the README's test command
is the one CI runs.

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
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
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
    names = {str(document.relative_to(REPO_ROOT)) for document in DOCUMENTS}
    assert names >= {"README.md", "docs/usage.md", "docs/interface.md", "docs/measurements/README.md"}
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


#: a Markdown link or image: ``[text](target)`` (no title strings are used in these docs)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)


def heading_anchors(document: Path):
    """The anchors GitHub gives the headings of ``document``: lower case, punctuation dropped, spaces as hyphens,
    ``-1``, ``-2``, ... after repeats. Lines in fenced code blocks are not headings."""
    anchors, seen = set(), {}
    for line in FENCE.sub("", document.read_text()).splitlines():
        heading = re.match(r"#{1,6} (.*)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def relative_links(document: Path):
    for match in LINK.finditer(FENCE.sub("", document.read_text())):
        target = match["target"]
        if not re.match(r"[a-z]+:", target):  # not http:, https:, mailto:
            yield target


#: design.md (edited elsewhere at the moment) still links the GPU notes at their old place beside it; strict,
#: so this mark fails as soon as the link is fixed and must then go
LINKS_KNOWN_BROKEN = {}


@pytest.mark.parametrize("document", [
    pytest.param(document, marks=pytest.mark.xfail(strict=True, reason=LINKS_KNOWN_BROKEN[document]))
    if document in LINKS_KNOWN_BROKEN else document for document in DOCUMENTS],
    ids=lambda document: str(document.relative_to(REPO_ROOT)))
def test_relative_links_resolve(document):
    """A moved or renamed page, or a renamed heading, breaks no link."""
    broken = []
    for target in relative_links(document):
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(f"{target}: no {linked.relative_to(REPO_ROOT) if REPO_ROOT in linked.parents else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{document.relative_to(REPO_ROOT)}: " + "; ".join(broken)


def test_paths_named_in_code_exist():
    """A docstring or comment that points the reader to a documentation file names one that exists (the benchmarks'
    ``docs/...`` paths are where they write, not what they read, and are not checked)."""
    missing = []
    for folder in ("agent_code", "patches", "tests", "examples"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for named in re.findall(r"\bdocs/[\w/.-]*\w", path.read_text()):
                if "*" not in named and not (REPO_ROOT / named).exists():
                    missing.append(f"{path.relative_to(REPO_ROOT)}: {named}")
    assert not missing, missing


def test_heading_anchors_follow_github():
    assert heading_anchors(REPO_ROOT / "docs" / "distributed.md") >= {
        "deepspeed-zero-2--zero-3-accelerate-launch",      # "/" and "(" dropped, each space a hyphen
        "the-same-loop-with-accelerate", "ci-cpu-testsdistributed"}


def readme_test_command():
    """The command of the README's ```bash block that runs pytest, as a list of words."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO_ROOT / "README.md").read_text(), re.S | re.M)
    commands = [line.split() for block in blocks for line in block.splitlines()
                if line.startswith("python3 -m pytest")]
    assert len(commands) == 1, f"the README shows {len(commands)} pytest commands in bash blocks, not one"
    return commands[0]


def test_ci_runs_the_readme_test_command():
    """.ci/run's last leg is the README's test command: same interpreter module and the same selection of tests
    (CI may add reporting options, ``--durations``, that select nothing)."""
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    ci_commands = [line.split() for line in ci.splitlines() if line.startswith('"$python" -m pytest')]
    assert len(ci_commands) == 1, ".ci/run should run exactly one pytest command with the main interpreter"
    ci_words = [word for word in ci_commands[0] if not word.startswith("--durations")]
    ci_words = ci_words[:ci_words.index("||")] if "||" in ci_words else ci_words
    assert ci_words == ["\"$python\"", *readme_test_command()[1:]]


def test_the_readme_test_command_skips_every_slow_test(request):
    """What README.md and docs/testing.md say of ``python3 -m pytest -q``: every test marked ``slow`` skipped
    (tests/conftest.py's hook); with ``-m slow`` they run."""
    from tests.conftest import pytest_collection_modifyitems

    class Item:
        def __init__(self, slow):
            self.markers = [pytest.mark.slow.mark] if slow else []

        def get_closest_marker(self, name):
            return next((mark for mark in self.markers if mark.name == name), None)

        def add_marker(self, marker):
            self.markers.append(marker.mark)

    class Config:
        def __init__(self, markexpr):
            self.markexpr = markexpr

        def getoption(self, name):
            return {"markexpr": self.markexpr}[name]

    for markexpr, slow_skipped in (("", True), ("not subprocess", True), ("slow", False), ("slow or not slow", False)):
        items = [Item(slow=True), Item(slow=False)]
        pytest_collection_modifyitems(Config(markexpr), items)
        assert [item.get_closest_marker("skip") is not None for item in items] == [slow_skipped, False], markexpr
