"""Small helpers shared by the runtime tests."""

from __future__ import annotations

# a word-level tokenizer: ids 0..3 are special, the rest one word each
WORDS = ["<pad>", "<s>", "</s>", "[UNK]"] + (
    "once upon a time there was the cat dog sat on mat and ran away home big small red blue green "
    "tree house bird sang sun moon"
).split()
PAD, BOS, EOS = 0, 1, 2


def word_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(WORDS[:3])
    return tokenizer.to_str()
