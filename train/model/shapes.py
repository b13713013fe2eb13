"""Named Llama shapes with random weights, for tests, the demo and benchmarks.

`tiny`, `mini` and `small` run on a laptop CPU (`tiny` for tests and the demo, `mini` for the
CPU study: bench/cpu_models.py compares them); `1b` and `8b` have the shapes of Llama-3.2-1B and
Llama-3.1-8B (the paper's backbone is the former) so that GPU benchmarks measure realistic
throughput and memory without downloading anything. The vocabulary is the run's tokenizer's
(at least the real models' 128,256 for the big shapes, so the embedding costs what it does).
"""

from __future__ import annotations

from transformers import LlamaConfig

SHAPES = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        min_vocab=0,
    ),
    "mini": dict(
        hidden_size=128,
        intermediate_size=336,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        min_vocab=0,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        min_vocab=0,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        min_vocab=128256,
        rope_theta=500000.0,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        min_vocab=128256,
        rope_theta=500000.0,
    ),
}


def shape_config(
    name: str, vocab_size: int, bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None
) -> LlamaConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown model.shape {name!r}; choose one of {', '.join(SHAPES)}")
    spec = dict(SHAPES[name])
    vocab = max(vocab_size, spec.pop("min_vocab"))
    return LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=2048,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        **spec,
    )
