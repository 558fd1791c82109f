"""PreferenceCollator and JSONL loading: truncation order, masks, chat template, skipped records, errors."""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from patches.collator import PreferenceCollator, PreferenceDataError, load_preference_jsonl
from patches.default_assets import generate_preferences

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def word_tokenizer(bos=True, chat_template=None):
    """One token per whitespace-separated word: token counts in the tests are word counts."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>" if bos else None, eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def words(*indices):
    """The words as text, with a space in front: prompt + answer is then the words of both (tokenised as one)."""
    return "".join(" " + WORDS[i] for i in indices)


def ids(tokenizer, *indices):
    return [tokenizer.convert_tokens_to_ids(WORDS[i]) for i in indices]


def test_batch_layout_masks_and_labels():
    tok = word_tokenizer()
    collator = PreferenceCollator(tok, max_length=32)
    records = [
        {"prompt": words(1, 2, 3), "chosen": words(4, 5), "rejected": words(6)},
        {"prompt": words(7), "chosen": words(8, 9, 10, 11), "rejected": words(12, 13, 14)},
    ]
    batch = collator(records)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    expected_rows = [  # chosen rows of both pairs first, then the rejected rows
        ([bos, *ids(tok, 1, 2, 3)], [*ids(tok, 4, 5), eos]),
        ([bos, *ids(tok, 7)], [*ids(tok, 8, 9, 10, 11), eos]),
        ([bos, *ids(tok, 1, 2, 3)], [*ids(tok, 6), eos]),
        ([bos, *ids(tok, 7)], [*ids(tok, 12, 13, 14), eos]),
    ]
    width = max(len(p) + len(a) for p, a in expected_rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, width)
    for row, (prompt, answer) in enumerate(expected_rows):
        n = len(prompt) + len(answer)
        padding = width - n
        assert batch["input_ids"][row].tolist() == prompt + answer + [pad] * padding
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * padding
        assert batch["labels"][row].tolist() == [-100] * len(prompt) + answer + [-100] * padding
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_prompt_is_truncated_from_the_left_first_keeping_bos():
    tok = word_tokenizer()
    collator = PreferenceCollator(tok, max_length=10, max_prompt_length=4)
    # prompt 1 + 8 tokens, answers 3 + 1 and 2 + 1: too long, the prompt alone is cut (to BOS + last 3)
    feature = collator.tokenize({"prompt": words(*range(8)), "chosen": words(20, 21, 22), "rejected": words(23, 24)})
    assert feature["prompt_input_ids"] == [tok.bos_token_id, *ids(tok, 5, 6, 7)]
    assert feature["chosen_input_ids"] == [*ids(tok, 20, 21, 22), tok.eos_token_id]
    assert feature["rejected_input_ids"] == [*ids(tok, 23, 24), tok.eos_token_id]


def test_answers_are_cut_from_the_right_only_after_the_prompt():
    tok = word_tokenizer(bos=False)
    collator = PreferenceCollator(tok, max_length=9, max_prompt_length=3)
    feature = collator.tokenize(
        {"prompt": words(0, 1, 2, 3, 4), "chosen": words(*range(10, 18)), "rejected": words(30, 31)}
    )
    assert feature["prompt_input_ids"] == ids(tok, 2, 3, 4)
    assert feature["chosen_input_ids"] == ids(tok, 10, 11, 12, 13, 14, 15)  # room 9 - 3: EOS cut
    assert feature["rejected_input_ids"] == [*ids(tok, 30, 31), tok.eos_token_id]  # short answer untouched


def test_short_records_are_not_truncated():
    tok = word_tokenizer()
    collator = PreferenceCollator(tok, max_length=8, max_prompt_length=2)
    feature = collator.tokenize({"prompt": words(0, 1, 2, 3), "chosen": words(5, 6), "rejected": words(7)})
    # 1 + 4 + 3 = 8 <= max_length: a prompt longer than max_prompt_length is kept whole
    assert feature["prompt_input_ids"] == [tok.bos_token_id, *ids(tok, 0, 1, 2, 3)]


def test_chat_template_records_match_their_rendered_text():
    tok = word_tokenizer(chat_template=TEMPLATE)
    collator = PreferenceCollator(tok, max_length=64)
    conversation = {
        "prompt": [{"role": "system", "content": words(0)}, {"role": "user", "content": words(1, 2)}],
        "chosen": [{"role": "assistant", "content": words(3, 4)}],
        "rejected": [{"role": "assistant", "content": words(5)}],
    }
    as_text = {
        "prompt": f"<|system|> {words(0)} <|end|> <|user|> {words(1, 2)} <|end|> <|assistant|> ",
        "chosen": f"{words(3, 4)} <|end|> ",
        "rejected": f"{words(5)} <|end|> ",
    }
    assert collator.render(conversation) == (as_text["prompt"], as_text["chosen"], as_text["rejected"])
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(collator([conversation])[key], collator([as_text])[key])
    labels = collator([conversation])["labels"][0]
    assert tok.convert_ids_to_tokens(labels[labels != -100].tolist()) == [WORDS[3], WORDS[4], "<|end|>", "</s>"]


def test_chat_records_need_a_chat_template():
    collator = PreferenceCollator(word_tokenizer(), max_length=16)
    record = {"prompt": [{"role": "user", "content": "w1"}], "chosen": [{"role": "assistant", "content": "w2"}],
              "rejected": [{"role": "assistant", "content": "w3"}]}
    with pytest.raises(ValueError, match="chat template"):
        collator.tokenize(record)


def test_bos_already_in_the_prompt_is_not_doubled():
    tok = word_tokenizer()
    feature = PreferenceCollator(tok, max_length=16).tokenize({"prompt": "<s> w1", "chosen": " w2", "rejected": " w3"})
    assert feature["prompt_input_ids"] == [tok.bos_token_id, *ids(tok, 1)]


def test_empty_answers_are_skipped_and_counted():
    collator = PreferenceCollator(word_tokenizer(), max_length=16)
    records = [
        {"prompt": words(1), "chosen": words(2), "rejected": words(3)},
        {"prompt": words(1), "chosen": "", "rejected": words(3)},
        {"prompt": words(1), "chosen": words(2), "rejected": "   "},
        {"prompt": words(4), "chosen": words(5, 6), "rejected": words(7)},
    ]
    batch = collator(records)
    assert collator.skipped_records == 2
    assert batch["input_ids"].shape[0] == 4  # two pairs kept -> 2 chosen + 2 rejected rows
    numbered = list(enumerate(records, start=1))
    assert len(collator.tokenize_dataset(numbered)) == 2
    assert collator.skipped_records == 4
    with pytest.raises(ValueError, match="skipped"):
        collator(records[1:3])


def test_answer_with_nothing_to_predict_is_skipped_without_bos():
    collator = PreferenceCollator(word_tokenizer(bos=False), max_length=16)
    # no BOS and an empty prompt: the first answer token is never predicted; "</s>" alone would remain
    assert collator.tokenize({"prompt": "", "chosen": words(2), "rejected": words(3)}) is not None
    assert collator.tokenize({"prompt": "", "chosen": "", "rejected": words(3)}) is None
    assert collator.skipped_records == 1


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="max_prompt_length"):
        PreferenceCollator(word_tokenizer(), max_length=8, max_prompt_length=8)


def write_lines(tmp_path, lines):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "p", "chosen": "c", "rejected": "r"', r"prefs.jsonl:3: invalid JSON"),
        (json.dumps({"prompt": "p", "chosen": "c"}), r"prefs.jsonl:3: missing key\(s\) \['rejected'\]"),
        (json.dumps(["p", "c", "r"]), r"prefs.jsonl:3: expected a JSON object"),
        (json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}), r"prefs.jsonl:3: 'chosen' must be a string"),
        (json.dumps({"prompt": [{"role": "user", "content": "p"}], "chosen": "c", "rejected": "r"}),
         r"prefs.jsonl:3: .*all be strings or all be message lists"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, bad_line, message):
    path = write_lines(tmp_path, [GOOD, "", bad_line, GOOD])  # blank line 2 still counts
    with pytest.raises(PreferenceDataError, match=message):
        load_preference_jsonl(path)


def test_jsonl_loads_numbered_records(tmp_path):
    path = write_lines(tmp_path, [GOOD, "", GOOD])
    assert [number for number, _ in load_preference_jsonl(path)] == [1, 3]
    with pytest.raises(PreferenceDataError, match="no records"):
        load_preference_jsonl(write_lines(tmp_path, ["", "  "]))
    with pytest.raises(PreferenceDataError, match="no such file"):
        load_preference_jsonl(tmp_path / "missing.jsonl")


LATIN1_RECORD = json.dumps({"prompt": "café?", "chosen": "oui", "rejected": "non"}, ensure_ascii=False)


@pytest.mark.parametrize(
    "content, message",
    [
        # a Latin-1 file: "é" is the single byte 0xe9, at character column 16 of line 3
        ((GOOD + "\n\n" + LATIN1_RECORD + "\n").encode("latin-1"), r"prefs.jsonl:3: not UTF-8 text \(byte 0xe9 at column 16\)"),
        # Windows line ends, a BOM, and non-ASCII UTF-8 before the bad byte on the same line: columns count characters
        (b"\xef\xbb\xbf" + (GOOD + "\r\n" + LATIN1_RECORD[:-1]).encode() + b"\xff}\r\n",
         r"prefs.jsonl:2: not UTF-8 text \(byte 0xff at column 55\)"),
        # the bad byte first on its line, after an old-Mac line end (a lone CR ends a line, as in text mode)
        ((GOOD + "\r").encode() + b"\x80" + GOOD.encode(), r"prefs.jsonl:2: not UTF-8 text \(byte 0x80 at column 1\)"),
    ],
    ids=["latin-1", "crlf-bom-multibyte", "cr-first-byte"],
)
def test_bytes_that_are_not_utf8_are_named_by_line_and_column(tmp_path, content, message):
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(content)
    with pytest.raises(PreferenceDataError, match=message):
        load_preference_jsonl(path)


def test_a_byte_order_mark_at_the_start_is_accepted(tmp_path):
    """Editors on Windows save "UTF-8" with a BOM in front of line 1: it is no part of the first record."""
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{LATIN1_RECORD}\r\n\r\n{GOOD}\r\n".encode())
    assert load_preference_jsonl(path) == [(1, json.loads(LATIN1_RECORD)), (3, json.loads(GOOD))]


def test_tokenize_dataset_errors_name_the_line():
    collator = PreferenceCollator(word_tokenizer(), max_length=16)
    chat = {"prompt": [{"role": "user", "content": "w1"}], "chosen": [{"role": "assistant", "content": "w2"}],
            "rejected": [{"role": "assistant", "content": "w3"}]}
    with pytest.raises(PreferenceDataError, match=r"data.jsonl:7: .*chat template"):
        collator.tokenize_dataset([(7, chat)], source="data.jsonl")


def test_shipped_default_data_is_what_the_generator_writes():
    for path, text in generate_preferences.expected_files().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} differs from its generator: regenerate it"
    records = [r for _, r in load_preference_jsonl(generate_preferences.TRAIN_FILE)]
    assert len(records) == generate_preferences.N_TRAIN
    assert all(r["chosen"] != r["rejected"] for r in records)


def test_padding_free_batch_against_a_hand_built_example():
    tok = word_tokenizer(bos=False)
    collator = PreferenceCollator(tok, max_length=32, padding_free=True)
    records = [
        {"prompt": words(1, 2), "chosen": words(4, 5), "rejected": words(6)},
        # no prompt: the answer's first token starts its sequence, so it has no label
        {"prompt": "", "chosen": words(8, 9, 10), "rejected": words(12, 13)},
    ]
    batch = collator(records)
    assert sorted(batch) == ["input_ids", "labels", "position_ids"]  # no attention_mask, no padding
    w, eos, x = (lambda *i: ids(tok, *i)), tok.eos_token_id, -100
    # chosen sequences of both pairs, then the rejected ones in the same pair order
    assert batch["input_ids"].tolist() == [
        [*w(1, 2), *w(4, 5), eos, *w(8, 9, 10), eos, *w(1, 2), *w(6), eos, *w(12, 13), eos]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [
        [x, x, *w(4, 5), eos, x, *w(9, 10), eos, x, x, *w(6), eos, x, *w(13), eos]]
    assert all(batch[key].dtype == torch.long for key in batch)
    # the same sequences as the padded batch, without its padding
    padded = PreferenceCollator(tok, max_length=32)(records)
    real = padded["attention_mask"].bool()
    assert torch.equal(padded["input_ids"][real], batch["input_ids"][0])
    with pytest.raises(TypeError, match="padding_free must be a bool"):
        PreferenceCollator(tok, padding_free=1)
