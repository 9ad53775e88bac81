"""A user factory file for Hugging Face models built from a config (no download).

    bsfinder probe examples/hf_models.py:gpt2 --model-kwargs '{"n_layer": 4}' \
        --input input_ids=256:int64:50257 --input labels=256:int64:50257 --memory-limit 4GiB

With ``labels`` the model computes its own language-model loss; without them bsfinder uses
the mean of the logits (use ``--loss cross-entropy`` for a real cross-entropy on them).
"""

from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)


def gpt2(n_layer=2, n_embd=256, n_head=4, vocab_size=50257, n_positions=256):
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=n_positions,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def bert(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, vocab_size=30522):
    config = BertConfig(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        intermediate_size=4 * hidden_size,
        vocab_size=vocab_size,
    )
    return BertForMaskedLM(config)


def llama(
    num_hidden_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    vocab_size=32000,
    max_position_embeddings=256,
):
    """A tiny Llama whose logits (batch x seq x vocab) dominate a step's memory."""
    config = LlamaConfig(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)
