"""The tokenizer of ``python -m patches train``: the embedded one, the ``--model`` folder's, or ``--tokenizer``'s.

A checkpoint saved without its tokenizer files does not fail to load everywhere: for some model types
``AutoTokenizer`` builds a tokenizer with no vocabulary (special tokens only), and every answer would tokenise to
nothing. Such a tokenizer is refused here, saying what is missing and how to pass one (``--tokenizer PATH``).
"""
import argparse
from pathlib import Path

from patches.cli_checks import CLIError

#: files any of which holds a tokenizer's vocabulary (fast, sentencepiece, BPE and WordPiece tokenizers)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "merges.txt", "vocab.txt", "tiktoken.model")
HOW_TO_PASS_ONE = "add --tokenizer PATH, the local folder of the tokenizer the model was trained with"


def check_tokenizer_args(args: argparse.Namespace) -> None:
    """``--tokenizer`` names a folder, and goes with ``--model`` (the embedded model has its own tokenizer)."""
    path = getattr(args, "tokenizer", None)
    if path is None:
        return
    if args.model is None:
        raise CLIError("--tokenizer needs --model: the embedded default model uses the embedded tokenizer")
    if not Path(path).is_dir():
        raise CLIError(f"--tokenizer {path}: {'not a folder' if Path(path).exists() else 'no such folder'}")


def tokenizer_source(args: argparse.Namespace):
    """``(flag, folder)`` the run's tokenizer comes from: ``--tokenizer``'s, else ``--model``'s (None: embedded)."""
    tokenizer = getattr(args, "tokenizer", None)
    return ("--tokenizer", tokenizer) if tokenizer is not None else ("--model", args.model)


def _has_tokenizer_files(folder) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def _missing_message(flag: str, path) -> str:
    message = f"{flag} {path}: no tokenizer in this folder (none of {', '.join(TOKENIZER_FILES[:5])}, ...)"
    if flag == "--model":
        return f"{message}: the checkpoint was saved without its tokenizer; {HOW_TO_PASS_ONE}"
    return f"{message}; give the folder where the tokenizer was saved (tokenizer.save_pretrained)"


def is_empty(tokenizer) -> bool:
    """True when the vocabulary holds special or added tokens only: no text can be tokenised."""
    vocabulary = set(tokenizer.get_vocab())
    return not vocabulary - set(tokenizer.all_special_tokens) - set(tokenizer.get_added_vocab())


def load_tokenizer(args: argparse.Namespace):
    """The run's tokenizer; a missing or empty one is a :class:`CLIError` saying how to pass one."""
    if args.model is None:
        from patches.default_assets import build_default_tokenizer

        return build_default_tokenizer()
    from transformers import AutoTokenizer

    flag, path = tokenizer_source(args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        if not _has_tokenizer_files(path):
            raise CLIError(_missing_message(flag, path)) from None
        raise CLIError(f"{flag} {path}: cannot load its tokenizer offline ({error})") from None
    if is_empty(tokenizer):
        if not _has_tokenizer_files(path):
            raise CLIError(_missing_message(flag, path))
        raise CLIError(f"{flag} {path}: its tokenizer has no vocabulary beyond its {len(tokenizer)} special "
                       f"token(s); {HOW_TO_PASS_ONE if flag == '--model' else 'give a complete tokenizer folder'}")
    return tokenizer
