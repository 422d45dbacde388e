"""Interactive text generation from a trained bytelm checkpoint (the upstream entry point, kept working).

    python inference.py [MODEL]          interactive prompt; /help lists commands (same as `bytelm chat MODEL`)
    echo "Once upon a time" | python inference.py MODEL --seed 1     one generation per input line

From Python, the upstream API:
    from inference import ByteLevelGenerator, InferenceConfig
    generator = ByteLevelGenerator("byte_llm_model.pt", InferenceConfig(max_new_bytes=512, temperature=0.8))
    print(generator.generate("The future of AI is"))

Everything real lives in bytelm.infer.generation and bytelm.cli.chat; this file only re-exports and dispatches.
"""
import sys

from bytelm.infer.generation import ByteLevelGenerator, InferenceConfig

__all__ = ["ByteLevelGenerator", "InferenceConfig"]

if __name__ == "__main__":
    import bytelm.cli.chat
    from bytelm.cli.run import run_cli

    sys.exit(run_cli(bytelm.cli.chat.main))
