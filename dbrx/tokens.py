"""DBRX's token-id facts, in one place: special tokens, stop ids, the real and the padded vocabulary.

Imports: nothing (the tokenizer, the config, generation and the data pipeline import these).
"""

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# cl100k's own special tokens, then the three DBRX adds.
SPECIAL_TOKENS: dict[str, int] = {
    ENDOFTEXT: 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
    PAD: 100277,
    IM_START: 100278,
    IM_END: 100279,
}

EOS_ID = SPECIAL_TOKENS[ENDOFTEXT]  # ends every document in prepared data
PAD_ID = SPECIAL_TOKENS[PAD]
IM_START_ID = SPECIAL_TOKENS[IM_START]
IM_END_ID = SPECIAL_TOKENS[IM_END]
STOP_IDS = (EOS_ID, IM_END_ID)  # generation stops on either

REAL_VOCAB_SIZE = 100280  # cl100k_base ids plus DBRX's special tokens (max id + 1)
PADDED_VOCAB_SIZE = 100352  # rows of the embedding / lm_head: REAL_VOCAB_SIZE padded to a multiple of 256
UNUSED_IDS = (100256, *range(100261, 100276))  # gaps in cl100k_base's ids below 100280: no token, cannot be decoded
