"""The embedded default of ``python -m patches train``: preference data, an offline tokenizer, a small Llama.

Nothing is downloaded. The tokenizer is a byte-level BPE trained here, with the ``tokenizers`` library,
on the shipped preference texts; the model is a random-init Llama whose vocabulary (32 000, Llama-2's
size) is far larger than its hidden size, the regime where the LM head dominates memory and the fused
loss pays off. The tokenizer uses only the first few thousand ids; the rest are valid, never-seen ids,
as in any model whose embedding is padded beyond its tokenizer.
"""
import json
from pathlib import Path
from typing import Iterator, List

ASSET_DIR = Path(__file__).resolve().parent
TRAIN_FILE = ASSET_DIR / "preferences_train.jsonl"
EVAL_FILE = ASSET_DIR / "preferences_eval.jsonl"

DEFAULT_VOCAB_SIZE = 32000
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
#: starts with the BOS, as the training rows do: ``apply_chat_template(..., tokenize=True)`` at inference gives the
#: tokens the model was trained on (the collator does not add a second BOS to a prompt that starts with one)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def default_data_files() -> List[Path]:
    """``[train, eval]`` JSONL files shipped with the package."""
    return [TRAIN_FILE, EVAL_FILE]


def _texts(paths: List[Path]) -> Iterator[str]:
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            yield from (record["prompt"], record["chosen"], record["rejected"])


def build_default_tokenizer():
    """A ``PreTrainedTokenizerFast``: byte-level BPE trained on the shipped texts (deterministic, < 1 s).

    Byte-level, so any text encodes; ``<s>`` is BOS, ``</s>`` EOS, ``<pad>`` padding; carries a simple
    chat template (``<s><|role|>\\ncontent<|end|>``) so conversational records work too. ``tokenizer(text)`` puts
    the BOS in front, as the collator does in training, so that the saved tokenizer (``AutoTokenizer`` on the
    output folder) gives at inference the tokens the model was trained on.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEFAULT_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_texts(default_data_files()), trainer=trainer)
    # saved in tokenizer.json, so every transformers release that loads it adds the BOS too
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_default_model(tokenizer, seed: int = 0):
    """Random-init ``LlamaForCausalLM``: 32k vocabulary, hidden 128, 2 layers (≈ 8.6 M parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=DEFAULT_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
