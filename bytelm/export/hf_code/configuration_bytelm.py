"""The configuration of a bytelm model for Hugging Face transformers (written by `bytelm export --format hf`).

The fields are bytelm's ModelConfig (bytelm/config.py); the names transformers looks for are mapped onto them.
"""
from transformers import PretrainedConfig


class ByteLMConfig(PretrainedConfig):
    model_type = "bytelm"
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
                     "max_position_embeddings": "block_size"}

    def __init__(self, vocab_size=256, n_layer=6, n_head=8, n_embd=192, block_size=512, mlp_ratio=4,
                 value_embeds=False, tie_embeddings=True, rope_base=10000.0, norm_eps=1e-6, **kwargs):
        self.vocab_size, self.n_layer, self.n_head, self.n_embd = vocab_size, n_layer, n_head, n_embd
        self.block_size, self.mlp_ratio, self.value_embeds = block_size, mlp_ratio, value_embeds
        self.tie_embeddings, self.rope_base, self.norm_eps = tie_embeddings, rope_base, norm_eps
        kwargs.setdefault("tie_word_embeddings", tie_embeddings)
        kwargs.setdefault("eos_token_id", 0)  # byte 0 ends a document in bytelm's corpora
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)
