"""Build the default model's training corpus: Python standard-library source, its tokenizer, token ids.

Owns choosing the files (every ``.py`` of the running interpreter's standard library, PSF
license), the deterministic train/held-out split by file, training the byte-level BPE
tokenizer on the training files only, and writing token ids as ``uint16`` arrays. It never
trains the model (``train_default_model.py``).

Output folder (default ``.corpus/``, git-ignored, carried to the GPU machine)::

    train.npy, heldout.npy   uint16 token ids, files joined with <|endoftext|>
    tokenizer/               tokenizer.json + tokenizer_config.json (AutoTokenizer loads it)
    meta.json                file/char/token counts and the held-out file list

Example:
    python scripts/build_corpus.py --out .corpus --vocab-size 8192
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sysconfig

import numpy as np

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (digits one by one, letters in words, punctuation runs, newlines
# apart from indentation), followed by byte-level mapping.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
HELDOUT_PERCENT = 2


def stdlib_files(root: str) -> list[tuple[str, str]]:
    """``(relative path, text)`` of every usable ``.py`` file under ``root``, sorted by path.

    Files that are not UTF-8 (the test suite ships deliberately broken ones) and codec
    tables (mostly non-ASCII literals, no code to learn from) are skipped.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip() or sum(ord(c) > 127 for c in text) > 0.01 * len(text):
                continue
            out.append((os.path.relpath(path, root), text))
    return sorted(out)


def is_heldout(relpath: str) -> bool:
    """A stable ~2% of files by path hash, so the split does not depend on file order."""
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def train_tokenizer(texts: list[str], vocab_size: int):
    """A Qwen-style byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   chat_template=CHAT_TEMPLATE, model_max_length=1024, clean_up_tokenization_spaces=False)


def save_tokenizer(tokenizer, path: str) -> None:
    """``save_pretrained``, then a ``tokenizer_config.json`` that transformers 4.45+ and 5 both read.

    transformers 5 writes its own class name (``TokenizersBackend``), a list of extra special
    tokens and the chat template in ``chat_template.jinja``, which 4.x cannot read; the generic
    fast class, ``additional_special_tokens`` and an inline template load everywhere.
    """
    tokenizer.save_pretrained(path, save_jinja_files=False)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config.pop("extra_special_tokens", None)
    config.update(tokenizer_class="PreTrainedTokenizerFast", additional_special_tokens=SPECIAL_TOKENS[1:],
                  chat_template=CHAT_TEMPLATE, bos_token=None)
    with open(config_file, "w") as f:
        json.dump(config, f, indent=2)


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    """Token ids of ``texts``, each followed by <|endoftext|>, as one ``uint16`` array."""
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    flat = [t for enc in ids for t in (*enc.ids, eot)]
    return np.asarray(flat, dtype=np.uint16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=sysconfig.get_paths()["stdlib"], help="standard library folder")
    parser.add_argument("--out", default=".corpus")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()

    files = stdlib_files(args.root)
    train = [(p, t) for p, t in files if not is_heldout(p)]
    heldout = [(p, t) for p, t in files if is_heldout(p)]
    tokenizer = train_tokenizer([t for _, t in train], args.vocab_size)
    if len(tokenizer) > 2 ** 16:
        raise ValueError(f"vocab-size must be <= 65536 to store ids as uint16, got {len(tokenizer)}")
    os.makedirs(args.out, exist_ok=True)
    save_tokenizer(tokenizer, os.path.join(args.out, "tokenizer"))
    train_ids, heldout_ids = encode(tokenizer, [t for _, t in train]), encode(tokenizer, [t for _, t in heldout])
    np.save(os.path.join(args.out, "train.npy"), train_ids)
    np.save(os.path.join(args.out, "heldout.npy"), heldout_ids)
    meta = {
        "root": args.root,
        "files": {"train": len(train), "heldout": len(heldout)},
        "chars": {"train": sum(len(t) for _, t in train), "heldout": sum(len(t) for _, t in heldout)},
        "bytes": {"train": sum(len(t.encode()) for _, t in train), "heldout": sum(len(t.encode()) for _, t in heldout)},
        "tokens": {"train": int(train_ids.size), "heldout": int(heldout_ids.size)},
        "vocab_size": len(tokenizer),
        "heldout_files": [p for p, _ in heldout],
    }
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(json.dumps({k: v for k, v in meta.items() if k != "heldout_files"}))


if __name__ == "__main__":
    main()
