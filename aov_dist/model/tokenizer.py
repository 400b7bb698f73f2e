"""The tiny preset's tokenizer, built locally (no download) and deterministically.

A byte-level BPE (like Qwen2's) trained on a fixed small corpus, wrapped in PreTrainedTokenizerFast
with Qwen's special tokens and a Qwen-format Jinja chat template. Byte-level means any text still
encodes (unknown words fall back to bytes); the corpus only decides which words are single tokens.
The adverbs of the splice (" slightly", " moderately", " highly") MUST be single tokens so that
their positions can be reserved at tokenization time: build_tiny_tokenizer checks it.
"""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen2's special tokens (the same strings, so templates and stop criteria are shared with the
# real checkpoints); ids are ours: 0, 1, 2.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ADVERBS = ("slightly", "moderately", "highly")
DETECTION_PROMPT = "Are there any defects for the object in the image? Please reply with 'Yes' or 'No'."

# Qwen2's template for string contents (system turn added when the conversation has none).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_DEFECT_WORDS = (
    "scratch scratches crack cracks hole holes dent contamination stain color print fold cut bent broken "
    "missing misplaced rough squeeze poke glue thread liquid oil faulty imprint damaged chipped burnt "
    "melted swollen fabric wood metal leather tile grid carpet bottle cable capsule hazelnut screw pill "
    "transistor toothbrush zipper candle capsules cashew chewinggum fryum macaroni pcb pipe object surface "
    "texture region area edge corner center left right top bottom upper lower small large tiny long thin "
    "dark bright circular irregular linear spot spots line lines mark marks patch pattern shape"
)
_SENTENCES = (
    DETECTION_PROMPT,
    "Yes", "No", "Yes.", "No.", "yes", "no",
    "Yes, there is a defect on the object.",
    "No, the object looks normal and has no defects.",
    "with slightly suspicious features: ",
    "with moderately suspicious features: ",
    "with highly suspicious features: ",
    "The object in the image is a {w}. There is a {w} in the {w} of the image.",
    "What type of defect is it? Where is the defect? Describe the anomaly in detail.",
    "The defect appears as a small dark scratch near the upper left corner of the surface.",
    "The image shows a normal object without any anomaly. It is an anomaly free sample.",
    "Is the object normal or anomalous? Please describe the image and point out the problem.",
    "This is a picture of an industrial product used for quality inspection.",
)


def _corpus() -> list[str]:
    """Fixed training text: chat pieces, prompts, answers, adverbs and defect words, repeated so
    their merges win. Order and content are constant, which (with a fixed trainer config) makes
    the learned vocabulary deterministic."""
    lines: list[str] = []
    for role in ("system", "user", "assistant"):
        lines.append(f"{IM_START}{role}\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
    words = _DEFECT_WORDS.split()
    for i, sentence in enumerate(_SENTENCES):
        lines.append(sentence.replace("{w}", words[i % len(words)]))
    lines.append(" ".join(words))
    lines.append(" ".join(f"with {a} suspicious features: " for a in ADVERBS))
    return lines * 20


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer in memory (~50 ms) and wrap it."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=32768,
    )
    check_single_token_adverbs(tok, ADVERBS)
    return tok


def adverb_token_ids(tokenizer, adverbs=ADVERBS) -> list[int]:
    """The single token id of " <adverb>" (with its leading space, as inside the spliced text)."""
    check_single_token_adverbs(tokenizer, adverbs)
    return [tokenizer.encode(" " + a, add_special_tokens=False)[0] for a in adverbs]


def check_single_token_adverbs(tokenizer, adverbs=ADVERBS) -> None:
    for adverb in adverbs:
        ids = tokenizer.encode(" " + adverb, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__}: adverb {adverb!r} encodes to {len(ids)} tokens {ids}; "
                "the splice needs exactly one token per adverb (its position is reserved at tokenization time)"
            )
