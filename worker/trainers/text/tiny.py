"""A tiny, offline causal LM (real Llama architecture, random weights) and a learnable dataset.

Used by the tests and the demo: nothing comes from a model hub. The tokenizer is a byte-level
BPE trained here on the dataset's grammar and renumbered canonically, so the same seed gives the
same model folder bytes in every process.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Fixed ids: pad 0, bos 1, eos 2, then the 256 byte symbols, then merges in merge order.
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIALS = [PAD, BOS, EOS]
VOCAB_SIZE = 384

# A small grammar: subject verb adjective noun [place]. Enough structure for a tiny model to
# learn (loss falls well below uniform) while staying varied.
_SUBJECTS = ["the cat", "a dog", "my friend", "the robot", "our teacher", "a small bird"]
_VERBS = ["likes", "sees", "finds", "wants", "draws", "paints"]
_ADJECTIVES = ["red", "blue", "green", "quiet", "bright", "old"]
_NOUNS = ["apples", "boxes", "trains", "flowers", "stones", "songs"]
_PLACES = ["in the garden", "at home", "near the river", "on monday", ""]

# A minimal chat template (role: content, EOS after each assistant reply) so chat datasets work
# with the tiny tokenizer. It renders turn by turn (a conversation's prefix renders as a prefix),
# which is what locating the assistant tokens for the loss mask needs.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_ADJECTIVES), rng.choice(_NOUNS)]
    place = rng.choice(_PLACES)
    if place:
        words.append(place)
    return " ".join(words) + "."


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    # Two or three sentences per row so sequences are long enough to batch and pad.
    return [" ".join(_sentence(rng) for _ in range(rng.randint(2, 3))) for _ in range(n)]


def make_text_dataset(out_file: Path, *, n: int = 64, seed: int = 0) -> Path:
    """Write `n` JSONL rows `{"text": ...}` drawn from the grammar above."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(out_file, "w", encoding="utf-8") as f:
        for text in _texts(n, seed):
            f.write(json.dumps({"text": text}) + "\n")
    return out_file


def _train_tokenizer(seed: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(512, seed + 1), trainer=trainer)

    # The trainer numbers tokens (and may order tied merges) per process; rebuild the model
    # from a canonical numbering so the tokenizer file is the same bytes everywhere.
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    vocab: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[sym] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))

    out = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    out.add_special_tokens(SPECIALS)
    out.pre_tokenizer = byte_level
    out.decoder = decoders.ByteLevel()
    # Prepend BOS like Llama tokenizers do; the dataset reader appends EOS itself.
    out.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return out


def build_tiny_text_model(out: Path, *, seed: int = 0) -> Path:
    """Save a tiny LlamaForCausalLM and its tokenizer into `out`; return `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(seed),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # Wider than the 0.02 default: with a final RMSNorm, a 64-wide model's logits are capped
        # by the lm_head row norms, and at 0.02 a LoRA on attention alone can barely move the
        # loss. At 0.1 the grammar is clearly learnable (loss roughly halves in 150 steps).
        initializer_range=0.1,
    )
    # Seeded init in a forked RNG so building a fixture never perturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
