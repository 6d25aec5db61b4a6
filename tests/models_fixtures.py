"""Model folders for tests: tiny random Llama (fast) and the real SmolLM2 (converted once, cached).

Import the fixtures into a test module: ``from models_fixtures import tiny_llama_dir, real_model_dir``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be "
    "paris france capital city river london england king queen model weight layer token cache"
).split()


def make_tokenizer(folder: Path):
    """A small word-level tokenizer trained in the test with the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def make_tiny_llama(folder: Path, *, tie: bool = True, seed: int = 0, layers: int = 2,
                    dtype: torch.dtype = torch.float32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # random init is tiny (std 0.02): widen it so logits differ visibly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


def make_column_scaled_llama(folder: Path, *, vocab: int, hidden: int, intermediate: int) -> Path:
    """A 2-layer random Llama whose weight columns differ in scale, as in real models (what the
    bit-allocation planners need to tell tensors and columns apart)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
                p.mul_(torch.rand(p.shape[1]) * 2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_untied_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-untied"), tie=False, seed=1)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF directory (converted once into the cache folder)."""
    from thawed.runtime.demo_model import demo_model_dir

    try:
        return demo_model_dir(os.environ.get("THAWED_TEST_MODEL_DIR") or None)
    except Exception as exc:  # the package is part of the test set-up: missing it is a failure
        pytest.fail(f"cannot prepare the real model: {exc}")
