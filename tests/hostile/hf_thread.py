"""A transformers GPT-2 whose module starts a thread at import: bsfinder then imports it in
every trial process, and this measures what that costs (transformers is a heavy import)."""

import threading

from transformers import GPT2Config, GPT2LMHeadModel

threading.Thread(target=threading.Event().wait, name="reporter", daemon=True).start()


def gpt2(n_layer: int = 2, n_embd: int = 128, vocab_size: int = 4096):
    config = GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=vocab_size, n_positions=128
    )
    return GPT2LMHeadModel(config)
