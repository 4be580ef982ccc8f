"""Tiny Hugging Face Llama checkpoints for tests, written with transformers itself (a test dependency).

`write_tiny_llama(dir)` leaves a directory shaped like a Hub download of a Llama 3 model: config.json,
safetensors (sharded with an index when asked), generation_config.json, and a byte-level BPE tokenizer with
Llama 3's special tokens, a BOS-adding post-processor and a chat template in tokenizer_config.json.
Weights are random (seeded): the tests compare logits, not quality.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, START_HEADER, END_HEADER, END_OF_TURN = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, END_OF_TURN]
# Llama 3's turn layout, written as Jinja the way Hub models ship it (HF renders it with trim_blocks and
# lstrip_blocks): each turn is a role header, a blank line, the content and an end-of-turn token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Hello! How are you today? I am fine, thank you for asking.",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "Rivers flow to the sea; clouds carry the water back over the hills.",
]


def build_tokenizer(vocab_size: int = 320) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 8, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def write_tiny_llama(directory: Path, *, tied: bool = False, rope_scaling: bool = True, shard: bool = False,
                     seed: int = 0, hidden_size: int = 64, layers: int = 2, max_positions: int = 256) -> Path:
    """A random LlamaForCausalLM with GQA (4 query heads, 2 key/value heads) saved as a Hub-style directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    bos_id, eot_id = tokenizer.token_to_id(BOS), tokenizer.token_to_id(END_OF_TURN)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": BOS, "eos_token": END_OF_TURN, "chat_template": CHAT_TEMPLATE,
        "model_max_length": max_positions, "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }, indent=2))
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32} if rope_scaling else None
    config = LlamaConfig(
        # A vocabulary padded past the tokenizer's, as real checkpoints often have.
        vocab_size=tokenizer.get_vocab_size() + 8, hidden_size=hidden_size, intermediate_size=160,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, rope_theta=500000.0, rope_scaling=scaling, rms_norm_eps=1e-5,
        tie_word_embeddings=tied, bos_token_id=bos_id, eos_token_id=eot_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size="40KB" if shard else "2GB")
    return directory


# Fine-tuning data: small generated files in the two formats of datasets/chat.py (data=chat_jsonl and
# data=prompt_completion_jsonl). Contents come from a seeded generator, so a test can rebuild the same file.
CHAT_SYSTEM = ["You are a helpful assistant.", "Answer briefly.", "You write Python."]
CHAT_QUESTIONS = ["How do I add two numbers?", "What is a fox?", "Where do rivers flow?", "How are you today?",
                  "What does os.path.join do?", "Say hello.", "Name a colour."]
CHAT_ANSWERS = ["Use a + b.", "A quick brown animal.", "Rivers flow to the sea.", "I am fine, thank you!",
                "It joins path parts: os.path.join('a', 'b').", "Hello!", "Blue, like the sea."]


def chat_conversation(rng) -> list[dict]:
    """A conversation of one to three user/assistant exchanges, sometimes after a system prompt."""
    messages = [{"role": "system", "content": rng.choice(CHAT_SYSTEM)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": rng.choice(CHAT_QUESTIONS)})
        messages.append({"role": "assistant", "content": rng.choice(CHAT_ANSWERS)})
    return messages


def write_chat_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """`n` generated conversations, one {"messages": [...]} object per line."""
    import random

    rng = random.Random(seed)
    path = Path(path)
    lines = [json.dumps({"messages": chat_conversation(rng)}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_prompt_completion_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """`n` generated {"prompt": ..., "completion": ...} pairs, one per line."""
    import random

    rng = random.Random(seed)
    path = Path(path)
    lines = []
    for _ in range(n):
        index = rng.randrange(len(CHAT_QUESTIONS))
        lines.append(json.dumps({"prompt": f"Q: {CHAT_QUESTIONS[index]}\nA:",
                                 "completion": f" {CHAT_ANSWERS[index]}"}))
    path.write_text("\n".join(lines) + "\n")
    return path
