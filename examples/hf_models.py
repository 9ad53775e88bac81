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


def vit(num_hidden_layers=2, hidden_size=128, image_size=64, patch_size=8, num_labels=10):
    """A ViT image classifier (inputs ``pixel_values=3x64x64``, ``labels=1:int64:10``); its
    initialisation draws with ``trunc_normal_``, which reads values."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        num_attention_heads=4,
        intermediate_size=4 * hidden_size,
        image_size=image_size,
        patch_size=patch_size,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def qwen2(num_hidden_layers=2, hidden_size=128, vocab_size=8192, max_position_embeddings=256):
    """A small Qwen2 (grouped-query attention: 2 key/value heads for 4 query heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
    )
    return Qwen2ForCausalLM(config)


def t5(num_layers=2, d_model=128, vocab_size=8192):
    """A small T5 encoder-decoder (with ``labels`` it builds the decoder's inputs itself)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        d_model=d_model,
        d_ff=4 * d_model,
        d_kv=d_model // 4,
        num_heads=4,
        vocab_size=vocab_size,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config)
