"""A byte-level BPE tokenizer trained in code, so the tiny twins need no download.

Deterministic: the same corpus and settings give the same vocabulary on every machine.
"""

from __future__ import annotations

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

_CORPUS = [
    "What is in the picture? A cat sits on the table next to a red cup.",
    "Describe the image in detail. The robot arm holds a blue box above the shelf.",
    "How many people are in the photo? There are three people walking on the street.",
    "Is there a dog in the image? Yes, a brown dog is lying on the grass.",
    "What color is the car? The car is white and parked near the green tree.",
    "Where is the ball? The ball is under the chair in the corner of the room.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: ASSISTANT: what where when which who how many is are the a an of on in under over",
    "left right top bottom front back near far small large open closed hand gripper camera",
    "0 1 2 3 4 5 6 7 8 9 10 yes no maybe person bottle door window kitchen road sky",
]


def train_tiny_tokenizer(vocab_size: int = 512):
    """Returns a `tokenizers.Tokenizer` (byte-level BPE, BOS added by its post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok
