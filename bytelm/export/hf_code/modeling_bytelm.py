"""A bytelm model for Hugging Face transformers (written by `bytelm export --format hf`): bytelm's architecture
(bytelm/model.py) as a PreTrainedModel, so AutoModelForCausalLM loads it with trust_remote_code=True.

    model = AutoModelForCausalLM.from_pretrained("byte_llm_hf", trust_remote_code=True)

Token ids are byte values (0-255). Each generation step runs the whole window again (no KV cache): simple, and
cheap at these sizes. Beyond the context (block_size bytes) the window keeps its last block_size bytes.
Shapes: B batch, T bytes, C = n_embd, H = n_head, D = C / H, V = 256.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_bytelm import ByteLMConfig


def apply_rotary(x, cos, sin):
    """Rotate pairs (x[i], x[i + D/2]); x: (B, T, ..., D), cos and sin: (T, 1, ..., D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, ve=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim)
        qk = apply_rotary(F.rms_norm(qkv[:, :, :2], (self.head_dim,)), cos, sin)  # QK-norm: (B, T, 2, H, D)
        v = qkv[:, :, 2]
        if ve is not None:  # value embeddings: this layer's byte table added to the values
            v = v + ve.view(B, T, self.n_head, self.head_dim)
        y = F.scaled_dot_product_attention(qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())  # ReLU^2


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, ve=None):
        x = x + self.attn(self.norm1(x), cos, sin, ve)
        return x + self.mlp(self.norm2(x))


class ByteLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ByteLMConfig
    base_model_prefix = "bytelm"
    _tied_weights_keys = {"head.weight": "embed.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.value_embed = (nn.Embedding(config.vocab_size, config.n_layer * config.n_embd)
                            if config.value_embeds else None)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def rotary(self, T, device):
        """cos and sin of positions 0..T-1, each (T, 1, 1, D/2), as bytelm builds them. Computed per call, not
        kept as buffers: from_pretrained builds the model on the meta device, where a buffer has no values."""
        half = self.config.n_embd // self.config.n_head // 2
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(half, dtype=torch.float32, device=device) / half))
        angles = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
        return angles.cos()[:, None, None, :], angles.sin()[:, None, None, :]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, value):
        self.head = value

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        """input_ids: (B, T) byte values, T <= block_size. Returns logits (B, T, 256) [and the loss in nats]."""
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"{T} bytes exceed the context of {self.config.block_size}")
        cos, sin = self.rotary(T, input_ids.device)
        x = self.embed(input_ids)  # (B, T, C)
        ves = (self.value_embed(input_ids).chunk(len(self.blocks), dim=-1) if self.value_embed is not None
               else [None] * len(self.blocks))
        for block, ve in zip(self.blocks, ves):
            x = block(x, cos, sin, ve)
        logits = self.head(self.norm_f(x))  # (B, T, V)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids[:, -self.config.block_size:]}  # the whole window, every step
