"""Preference data for SimPO training: the ``[chosen; rejected]`` collator (loading: :mod:`patches.preference_data`).

Records follow TRL's preference formats (:mod:`patches.preference_layouts`): ``{"prompt", "chosen", "rejected"}``
as strings, or — when the tokenizer has a chat template — as lists of ``{"role", "content"}`` messages (the
prompt's turns, then each answer's assistant turn(s)); ``{"chosen", "rejected"}`` alone, the prompt being their
common start (TRL's implicit prompt); or UltraFeedback's string prompt with message-list answers that repeat the
user turn. They are tokenised as TRL 1.16's ``CPOTrainer`` does. The collator produces what the patched model
takes: rows ``[0, B)`` the chosen sequences, rows ``[B, 2B)`` the rejected ones, ``labels = -100`` on prompt and
padding; or, with ``padding_free=True``, the same 2B sequences packed end to end into one row (``position_ids``
restarting at 0). Files in other formats (JSON, Parquet, a ``datasets`` folder): :mod:`patches.preference_data`.
"""
from itertools import takewhile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from patches.preference_data import (  # noqa: F401 (the loading helpers are public here too)
    PreferenceDataError, check_record, checked_records, load_preference_jsonl, read_utf8)
from patches.preference_layouts import explicit_prompt, render_conversation

TOKENIZED_KEYS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
#: optional keys of a tokenized record whose chosen and rejected prompts differ (see :meth:`PreferenceCollator.tokenize`)
ANSWER_PROMPT_KEYS = ("chosen_prompt_input_ids", "rejected_prompt_input_ids")


class PreferenceCollator:
    """Tokenise, truncate and pad preference records into one ``[chosen; rejected]`` batch.

    Per record, as TRL 1.16's ``CPOTrainer`` (``tokenize_row``): the record is brought to an explicit prompt and
    rendered to text (:mod:`patches.preference_layouts`); ``prompt + answer`` is tokenised as one text, and the
    answer's tokens are those after the prompt's (one token earlier when the prompt's last token merges with the
    answer's start). Each prompt gets a BOS in front (unless already there), each non-empty answer an EOS at the
    end. Truncation: when ``prompt + longer answer`` exceeds ``max_length``, the prompt is first cut from the left
    to ``max_prompt_length`` tokens (BOS kept); if that is still too long, both answers are cut from the right to
    the room left. A record whose chosen or rejected answer is left with no token to predict is skipped and counted
    in ``skipped_records``.

    ``__call__`` takes raw records or the output of :meth:`tokenize` and returns ``input_ids``,
    ``attention_mask`` (1 on real tokens) and ``labels`` (answer tokens; ``-100`` on prompt and
    padding), each of shape ``(2B, L)``, right-padded to the longest row.

    With ``padding_free=True`` the same 2B sequences (chosen ones first, then the rejected ones in the same pair
    order) are concatenated into one row without padding, the convention of transformers'
    ``DataCollatorWithFlattening``: ``input_ids``, ``position_ids`` (restarting at 0 at each sequence) and
    ``labels`` of shape ``(1, N)``, N the number of real tokens, no ``attention_mask``. Each sequence's first
    label is ``-100`` too, so that a shift by one never predicts a token from the previous sequence.
    """

    def __init__(self, tokenizer, max_length: int = 512, max_prompt_length: Optional[int] = None,
                 label_pad_token_id: int = -100, padding_free: bool = False):
        max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
        if not 0 < max_prompt_length < max_length:
            raise ValueError(
                f"need 0 < max_prompt_length < max_length, got max_prompt_length={max_prompt_length}, "
                f"max_length={max_length}"
            )
        if not isinstance(padding_free, bool):
            raise TypeError(f"padding_free must be a bool (True or False), got {padding_free!r}")
        self.padding_free = padding_free
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.label_pad_token_id = label_pad_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = 0 if pad is None else pad
        self.skipped_records = 0

    def render(self, record: Dict[str, Any]) -> Tuple[str, str, str]:
        """Prompt, chosen and rejected as text, the prompt made explicit; message lists go through the tokenizer's
        chat template (as TRL's ``maybe_extract_prompt`` then ``maybe_apply_chat_template``)."""
        prompt, chosen, rejected = explicit_prompt(record)
        if isinstance(prompt, str):
            return prompt, chosen, rejected
        return render_conversation(self.tokenizer, prompt, chosen, rejected, record.get("chat_template_kwargs"))

    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _split(self, prompt_text: str, prompt_ids: List[int], answer_text: str) -> Tuple[List[int], List[int]]:
        """``(prompt, answer)`` ids of ``prompt_text + answer_text`` tokenised as one text (TRL's
        ``build_tokenized_answer``): where the prompt's last token merges with the answer, it goes to the answer."""
        full = self._encode(prompt_text + answer_text)
        if len(prompt_ids) > len(full):
            raise ValueError("the prompt alone tokenises to more tokens than prompt + answer")
        start = len(prompt_ids) - (full[:len(prompt_ids)] != prompt_ids)
        return full[:start], full[start:]

    def tokenize(self, record: Dict[str, Any]) -> Optional[Dict[str, List[int]]]:
        """Token ids of one record after truncation, or ``None`` (and counted) when it must be skipped.

        Returns ``prompt_input_ids``, ``chosen_input_ids`` and ``rejected_input_ids``. When the prompt's last token
        merges with one answer's start but not with the other's, the chosen and rejected rows have different
        prompts (by their last token; TRL refuses larger differences, and so does this): they are given as
        ``chosen_prompt_input_ids`` and ``rejected_prompt_input_ids`` too, ``prompt_input_ids`` being their common
        start.
        """
        prompt_text, *answer_texts = self.render(record)
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        prompt_alone = self._encode(prompt_text)
        prompts, answers = zip(*(self._split(prompt_text, prompt_alone, text) for text in answer_texts))
        if sum(a != b for a, b in zip(*prompts)) > 1 or abs(len(prompts[0]) - len(prompts[1])) > 1:
            raise ValueError("the chosen and rejected prompts tokenise differently beyond their last token")
        prompts = [[bos] + p if bos is not None and p[:1] != [bos] else p for p in prompts]
        # An empty answer stays empty: an EOS alone would train "stop here", not the answer.
        answers = [a + [eos] if a and eos is not None and a[-1] != eos else a for a in answers]
        if max(len(p) + len(a) for p, a in zip(prompts, answers)) > self.max_length:
            prompts = [self._cut_prompt(p, bos) for p in prompts]
            answers = [a[:self.max_length - len(p)] for p, a in zip(prompts, answers)]
        # labels are shifted by one inside the model: an answer's first token is predicted only after a prompt token
        if min(len(a) - (0 if p else 1) for p, a in zip(prompts, answers)) <= 0:
            self.skipped_records += 1
            return None
        common = len(list(takewhile(lambda pair: pair[0] == pair[1], zip(*prompts))))
        feature = dict(zip(TOKENIZED_KEYS, (prompts[0][:common], *answers)))
        if prompts[0] != prompts[1]:
            feature.update(zip(ANSWER_PROMPT_KEYS, prompts))
        return feature

    def _cut_prompt(self, prompt: List[int], bos: Optional[int]) -> List[int]:
        """The prompt cut from the left to ``max_prompt_length`` tokens, its BOS kept; unchanged when shorter."""
        if len(prompt) <= self.max_prompt_length:
            return prompt
        head = prompt[:1] if bos is not None else []
        return head + prompt[len(prompt) - (self.max_prompt_length - len(head)):]

    def tokenize_dataset(self, numbered_records: Iterable[Tuple[int, Dict[str, Any]]],
                         source: str = "<records>") -> List[Dict[str, List[int]]]:
        """Tokenise ``[(line_number, record), ...]``; skipped records are counted; errors name ``source:line``."""
        features = []
        for line_number, record in numbered_records:
            try:
                feature = self.tokenize(record)
            except ValueError as error:
                raise PreferenceDataError(f"{source}:{line_number}: {error}") from None
            if feature is not None:
                features.append(feature)
        return features

    def __call__(self, features: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        tokenized = []
        for feature in features:
            if all(key in feature for key in TOKENIZED_KEYS):
                tokenized.append(feature)
            else:
                maybe = self.tokenize(feature)
                if maybe is not None:
                    tokenized.append(maybe)
        if not tokenized:
            raise ValueError(f"every record of this batch was skipped (empty answers); {len(features)} given")
        rows, label_rows = [], []
        for answer_key, prompt_key in zip(TOKENIZED_KEYS[1:], ANSWER_PROMPT_KEYS):
            for feature in tokenized:
                prompt, answer = feature.get(prompt_key, feature["prompt_input_ids"]), feature[answer_key]
                rows.append(list(prompt) + list(answer))
                label_rows.append([self.label_pad_token_id] * len(prompt) + list(answer))
        if self.padding_free:
            return self.packed(rows, label_rows)
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), self.label_pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, label_row) in enumerate(zip(rows, label_rows)):
            input_ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row)] = torch.tensor(label_row)
            attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def packed(self, rows: List[List[int]], label_rows: List[List[int]]) -> Dict[str, torch.Tensor]:
        """The sequences ``rows`` (with their ``label_rows``) end to end in one row: ``input_ids``,
        ``position_ids`` and ``labels`` of shape ``(1, N)``; each sequence's first label is ``label_pad_token_id``."""
        input_ids = torch.tensor([token for row in rows for token in row], dtype=torch.long)
        labels = torch.tensor([label for row in label_rows for label in [self.label_pad_token_id, *row[1:]]],
                              dtype=torch.long)
        position_ids = torch.cat([torch.arange(len(row), dtype=torch.long) for row in rows])
        return {"input_ids": input_ids[None], "position_ids": position_ids[None], "labels": labels[None]}
