"""bytelm's tokenizer for Hugging Face transformers (written by `bytelm export --format hf`): the UTF-8 bytes of
the text, each id the byte's value (0-255), no special ids added. decode() turns invalid UTF-8 into U+FFFD.

    tokenizer = AutoTokenizer.from_pretrained("byte_llm_hf", trust_remote_code=True)
    tokenizer("héllo")["input_ids"]   # [104, 195, 169, 108, 108, 111]
"""
from transformers import PreTrainedTokenizer


class ByteLMTokenizer(PreTrainedTokenizer):
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, **kwargs):
        kwargs.setdefault("eos_token", None)
        kwargs.setdefault("pad_token", None)
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return 256

    def get_vocab(self):
        return {chr(i): i for i in range(256)}  # token i is the character with code point i (latin-1)

    def _tokenize(self, text, **kwargs):
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token):
        return ord(token) if len(token) == 1 and ord(token) < 256 else None

    def _convert_id_to_token(self, index):
        return chr(index)

    def convert_tokens_to_string(self, tokens):
        return bytes(ord(t) for t in tokens if len(t) == 1 and ord(t) < 256).decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()  # the vocabulary is the 256 byte values: nothing to save
