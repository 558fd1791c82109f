"""Preference record layouts: UltraFeedback's and TRL's implicit prompt give TRL 1.16's own tokens.

The reference is TRL's ``CPOTrainer`` itself: it prepares a ``datasets.Dataset`` of the records (``maybe_extract_prompt``,
``maybe_apply_chat_template``, ``tokenize_row``) and its rows are compared with the collator's, token for token and
label for label, with the embedded tokenizer (byte-level BPE with a chat template).
"""
import json
import os

import pytest
import torch

from patches.collator import PreferenceCollator, PreferenceDataError, load_preference_jsonl
from patches.default_assets import TRAIN_FILE, build_default_tokenizer
from patches.preference_layouts import explicit_prompt, extract_prompt
from tests.helpers import random_llama

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Answer briefly."}
#: each layout, from a string record of the shipped data
LAYOUTS = {
    "strings": lambda r: dict(r),
    "messages": lambda r: {"prompt": [user(r["prompt"])], "chosen": [assistant(r["chosen"])],
                           "rejected": [assistant(r["rejected"])]},
    # UltraFeedback (HuggingFaceH4/ultrafeedback_binarized): a string prompt, answers that repeat the user turn
    "ultrafeedback": lambda r: {"prompt": r["prompt"], "chosen": [user(r["prompt"]), assistant(r["chosen"])],
                                "rejected": [user(r["prompt"]), assistant(r["rejected"])], "score_chosen": 8.0},
    # TRL's implicit prompt (trl-lib/ultrafeedback_binarized): whole conversations sharing their start
    "implicit-messages": lambda r: {"chosen": [SYSTEM, user(r["prompt"]), assistant(r["chosen"])],
                                    "rejected": [SYSTEM, user(r["prompt"]), assistant(r["rejected"])]},
    # ... or whole texts: the prompt ends where they differ, often inside a word (the minimal pairs)
    "implicit-strings": lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
}


@pytest.fixture(scope="module")
def shipped_records():
    return [record for _, record in load_preference_jsonl(TRAIN_FILE)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_default_tokenizer()


def trl_rows(tokenizer, records):
    """``[(chosen ids, chosen labels, rejected ids, rejected labels), ...]`` as TRL's CPOTrainer prepares them."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model = random_llama(0, vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1)
    config = CPOConfig(output_dir="unused", max_length=4096, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = CPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                         processing_class=tokenizer)
    keys = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    return [tuple(row[key] for key in keys) for row in trainer.train_dataset]


def our_rows(tokenizer, record):
    batch = PreferenceCollator(tokenizer, max_length=4096)([record])
    rows = []
    for row in (0, 1):  # the chosen row, then the rejected one
        real = batch["attention_mask"][row].bool()
        rows += [batch["input_ids"][row][real].tolist(), batch["labels"][row][real].tolist()]
    return tuple(rows)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_tokens_of_trl(shipped_records, tokenizer, layout):
    records = [LAYOUTS[layout](record) for record in shipped_records]
    expected = trl_rows(tokenizer, records)
    assert len(expected) == len(records)
    for index, (record, want) in enumerate(zip(records, expected)):
        assert our_rows(tokenizer, record) == want, f"record {index}: {json.dumps(record)[:200]}"


def test_merges_at_the_prompt_end_are_tokenised_as_trl_does(shipped_records, tokenizer):
    """With an implicit text prompt the split falls inside a word ("... is T" + "uesday."): the prompt's last
    token merges with the answer and goes to it; chosen and rejected prompts can then differ by that token."""
    collator = PreferenceCollator(tokenizer, max_length=4096)
    features = [collator.tokenize(LAYOUTS["implicit-strings"](record)) for record in shipped_records]
    merged = [f for f in features if "chosen_prompt_input_ids" in f]
    assert merged, "no record whose chosen and rejected prompts differ: the test data lost its minimal pairs"
    for feature in merged:
        chosen_prompt, rejected_prompt = feature["chosen_prompt_input_ids"], feature["rejected_prompt_input_ids"]
        assert chosen_prompt != rejected_prompt
        assert feature["prompt_input_ids"] in (chosen_prompt[:-1], rejected_prompt[:-1])


def test_ultrafeedback_and_implicit_records_are_the_explicit_conversation(tokenizer):
    prompt, good, bad = (f"w{torch.randint(100, (1,)).item()} question", " a good answer", " a bad answer")
    explicit = {"prompt": [user(prompt)], "chosen": [assistant(good)], "rejected": [assistant(bad)]}
    ultrafeedback = {"prompt": prompt, "chosen": [user(prompt), assistant(good)],
                     "rejected": [user(prompt), assistant(bad)], "messages": [], "prompt_id": "x"}
    implicit = {"chosen": [user(prompt), assistant(good)], "rejected": [user(prompt), assistant(bad)]}
    collator = PreferenceCollator(tokenizer)
    want = collator.tokenize(explicit)
    assert collator.render(ultrafeedback) == collator.render(implicit) == collator.render(explicit)
    assert collator.tokenize(ultrafeedback) == collator.tokenize(implicit) == want


def test_text_prompt_extraction_follows_trl():
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert extract_prompt("Day: Tuesday.", "Day: Thursday.") == ("Day: T", "uesday.", "hursday.")
    assert extract_prompt("abc", "abcd") == ("ab", "c", "cd")  # one the start of the other: TRL's loop end
    assert extract_prompt("yes", "no") == ("", "yes", "no")
    turns = [user("q"), assistant("a1")]
    assert extract_prompt(turns, [user("q"), assistant("a2")]) == ([user("q")], [assistant("a1")], [assistant("a2")])


@pytest.mark.parametrize(
    "record, message",
    [
        ({"chosen": [assistant("a")], "rejected": [assistant("b")]}, "no shared prompt to extract"),
        ({"chosen": [user("q"), assistant("a")], "rejected": "b"}, "both be strings or both be message lists"),
        ({"prompt": [user("q")], "chosen": "a", "rejected": "b"}, "a message-list 'prompt' needs message-list"),
        ({"prompt": "q", "chosen": "a"}, r"missing key\(s\) \['rejected'\]"),
        ({"prompt": "q", "chosen": [], "rejected": "b"}, "'chosen' must be a string or a non-empty list"),
        ({"chosen": [SYSTEM, user("q")], "rejected": [SYSTEM, assistant("b")]}, "last message has role 'system'"),
    ],
)
def test_records_trl_cannot_use_are_refused_with_a_reason(record, message):
    with pytest.raises(ValueError, match=message):
        explicit_prompt(record)


def test_jsonl_of_each_layout_loads_and_a_bad_line_is_named(tmp_path, shipped_records):
    lines = [json.dumps(LAYOUTS[layout](shipped_records[i])) for i, layout in enumerate(LAYOUTS)]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [number for number, _ in load_preference_jsonl(path)] == list(range(1, len(LAYOUTS) + 1))
    path.write_text("\n".join([*lines, json.dumps({"chosen": [user("q")], "rejected": "r"})]) + "\n", encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=rf"mixed.jsonl:{len(LAYOUTS) + 1}: 'chosen' and 'rejected' must"):
        load_preference_jsonl(path)
