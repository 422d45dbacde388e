"""Model configuration: one typed dataclass, validated, serialisable to a plain dict for checkpoints.

Training settings live in `bytelm.train.config` (TrainConfig and its presets).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from bytelm.errors import BytelmError, check_field_types, invalid

VOCAB_SIZE = 256  # raw bytes: every value 0..255 is a token, there are no special ids

# Bounds that keep a hostile or mistyped config from allocating absurd amounts of memory.
_MAX_LAYERS = 256
_MAX_EMBD = 16384
MAX_CONTEXT = 1 << 17  # bytes; also the most of a prompt any model can use (bytelm.cli.generate)


@dataclass
class ModelConfig:
    vocab_size: int = VOCAB_SIZE  # fixed: bytes are the tokens; kept in the config so a checkpoint says so
    n_layer: int = 6  # upstream shape; depth buys more than width at this size
    n_head: int = 8  # upstream shape; head size 192 / 8 = 24
    n_embd: int = 192  # width giving about 2.7M parameters with the defaults (brief: about 2.5M)
    block_size: int = 512  # context window in bytes (upstream); generation slides past it
    mlp_ratio: int = 4  # hidden width of the MLP as a multiple of n_embd (GPT-2 convention)
    # A second byte table per layer, added to that layer's attention values (modded-nanogpt's "value
    # embeddings"): every layer sees the raw byte again. Off by default, so checkpoints written before it load
    # as they were; `train.py --value-embeds` turns it on. docs/training.md, "Value embeddings".
    value_embeds: bool = False
    tie_embeddings: bool = True  # share input embedding and output head: 49k fewer parameters, no loss at vocab 256
    rope_base: float = 10000.0  # rotary frequency base (RoFormer / LLaMA default)
    norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BytelmError (one clear line) if any field is out of range."""
        bad = invalid("model config")
        check_field_types(self, bad)
        if self.vocab_size != VOCAB_SIZE:
            bad(f"vocab_size must be {VOCAB_SIZE} (bytes), got {self.vocab_size}")
        if not 1 <= self.n_layer <= _MAX_LAYERS:
            bad(f"n_layer must be in 1..{_MAX_LAYERS}, got {self.n_layer}")
        if not 1 <= self.n_head <= self.n_embd:
            bad(f"n_head must be in 1..n_embd, got {self.n_head}")
        if not 1 <= self.n_embd <= _MAX_EMBD:
            bad(f"n_embd must be in 1..{_MAX_EMBD}, got {self.n_embd}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            bad(f"n_embd ({self.n_embd}) must split into n_head ({self.n_head}) heads of even size (rotary)")
        if not 1 <= self.block_size <= MAX_CONTEXT:
            bad(f"block_size must be in 1..{MAX_CONTEXT}, got {self.block_size}")
        if not 1 <= self.mlp_ratio <= 16:
            bad(f"mlp_ratio must be in 1..16, got {self.mlp_ratio}")
        # finite too (check_field_types): rope_base=inf passed `> 1` and silently turned rotary positions off
        if not 1 < self.rope_base:
            bad(f"rope_base must be a finite number > 1, got {self.rope_base!r}")
        if not 0 < self.norm_eps < 1:
            bad(f"norm_eps must be in (0, 1), got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a checkpoint's plain dict; unknown keys are an error, missing keys take defaults."""
        if not isinstance(d, dict):
            raise BytelmError("invalid model config: not a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BytelmError(f"invalid model config: unknown fields {unknown}")
        return cls(**d)


# Named model sizes. "default" is the upstream shape.
MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),  # tests: trains in seconds
    "default": {},
}

# Documents are joined with one NUL byte when a corpus is built, and generation stops when the model emits
# it (end of document). NUL never occurs in text, so for text corpora it is an unambiguous end marker; in
# binary corpora it is just another byte. Not a special id: it is byte 0, part of the 256-symbol vocabulary.
DOC_SEPARATOR = 0
