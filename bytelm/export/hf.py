"""A Hugging Face transformers folder from a bytelm model: `bytelm export MODEL --format hf -o folder/`.

    from bytelm.export.hf import write_hf_folder
    write_hf_folder(model, "byte_llm_hf")        # then, with transformers alone:
    # AutoModelForCausalLM.from_pretrained("byte_llm_hf", trust_remote_code=True)

The folder: config.json (bytelm's ModelConfig, and auto_map naming the code), model.safetensors (the weights
under bytelm's own names, the tied head stored once), the code that transformers runs (hf_code/: the
configuration, a PreTrainedModel reproducing bytelm.model.ByteLM, a tokenizer whose ids are byte values),
tokenizer_config.json and generation_config.json. Written into a temporary folder beside `out` and renamed
into place, so a failed export leaves no half-written folder. bytelm itself needs no transformers for this.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from bytelm.config import DOC_SEPARATOR
from bytelm.errors import BytelmError
from bytelm.model import ByteLM

CODE = Path(__file__).with_name("hf_code")
CODE_FILES = ("configuration_bytelm.py", "modeling_bytelm.py", "tokenization_bytelm.py")


def hf_config(model: ByteLM) -> dict:
    """config.json: bytelm's ModelConfig, plus what transformers reads (model type, class names, byte 0 as the
    end of a document)."""
    return {
        "model_type": "bytelm",
        "architectures": ["ByteLMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_bytelm.ByteLMConfig",
                     "AutoModelForCausalLM": "modeling_bytelm.ByteLMForCausalLM"},
        **model.config.to_dict(),
        "tie_word_embeddings": model.config.tie_embeddings,
        "eos_token_id": DOC_SEPARATOR,
        "pad_token_id": DOC_SEPARATOR,
        "torch_dtype": "float32",
    }


def write_hf_folder(model: ByteLM, out: str | os.PathLike) -> None:
    """Write `model` as a transformers folder at `out`, which must not exist or be empty."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BytelmError(f"{out} already exists{' and is not empty' if out.is_dir() else ''}; choose another -o "
                          "or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_embeddings:
            state.pop("head.weight")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # transformers' marker
        files = {
            "config.json": hf_config(model),
            "generation_config.json": {"eos_token_id": DOC_SEPARATOR, "pad_token_id": DOC_SEPARATOR,
                                       "use_cache": False},
            "tokenizer_config.json": {"tokenizer_class": "ByteLMTokenizer",
                                      "auto_map": {"AutoTokenizer": ["tokenization_bytelm.ByteLMTokenizer", None]},
                                      "model_max_length": model.config.block_size},
        }
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        for name in CODE_FILES:
            shutil.copyfile(CODE / name, tmp / name)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except OSError as e:
        raise BytelmError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
