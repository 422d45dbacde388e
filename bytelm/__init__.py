"""bytelm: a byte-level transformer language model (vocabulary 256, no tokenizer).

    from bytelm import ByteLM, ModelConfig, load_model, save_checkpoint
    from bytelm import ByteLevelGenerator, InferenceConfig      # generation
    from bytelm import score_bytes, entropy_patches             # per-byte surprisal (bytelm.codec.score)
    from bytelm import compress_bytes, decompress_bytes         # lossless, with a model (bytelm.codec.compress)
"""
from bytelm.checkpoint import DEFAULT_PATH, load_model, save_checkpoint
from bytelm.config import ModelConfig
from bytelm.errors import BytelmError, CheckpointError, DataError
from bytelm.model import ByteLM, KVCache

__version__ = "0.1.0"

# Heavier parts load on first use, so `import bytelm` stays light.
_LAZY = {
    "ByteLevelGenerator": "bytelm.infer.generation",
    "InferenceConfig": "bytelm.infer.generation",
    "score_bytes": "bytelm.codec.score",
    "ByteScores": "bytelm.codec.score",
    "entropy_patches": "bytelm.codec.score",
    "compress_bytes": "bytelm.codec.compress",
    "decompress_bytes": "bytelm.codec.compress",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bytelm' has no attribute {name!r}")


__all__ = ["ByteLM", "KVCache", "ModelConfig", "load_model", "save_checkpoint", "DEFAULT_PATH",
           "BytelmError", "CheckpointError", "DataError", "ByteLevelGenerator", "InferenceConfig", "__version__",
           "score_bytes", "ByteScores", "entropy_patches", "compress_bytes",
           "decompress_bytes"]
