"""The built-in character-level tokenizer: one token per character, plus chat special tokens.

Characters as tokens keep digits separate (good for arithmetic) and make the vocabulary tiny,
so the built-in model spends its parameters on layers rather than embeddings. The chat template
is the plain ``User: ... / Assistant: ...</s>`` layout (``data.template: plain``).
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from tunesmith.data.formats import PLAIN

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHARS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))


def build_tokenizer():  # -> PreTrainedTokenizerFast
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = PLAIN  # the ChatML tokens exist too, for data.template=chatml
    return fast
