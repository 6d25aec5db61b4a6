"""The model built without transformers (runtime/native.py) and the tokenizers-only tokenizer
(runtime/tokenizer.py) give what transformers gives: the same logits through ``Stepper``, the same
greedy tokens from a checkpoint, the same token ids and text; and ``thawed generate`` then runs
without importing transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from models_fixtures import make_tokenizer, make_tiny_llama, real_model_dir, tiny_llama_dir  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

from thawed.codecs.errors import ThawedError
from thawed.runtime.compress.pipeline import compress
from thawed.runtime.compress.plan import Plan, parse_codec_choice
from thawed.runtime.errors import ConfigError
from thawed.runtime.generate import SamplingParams, generate_tokens
from thawed.runtime.loading import load_for_inference
from thawed.runtime.model import LazyModel, RuntimeConfig
from thawed.runtime.native import NativeCausalLM, build_native, native_config
from thawed.runtime.stepper import Stepper
from thawed.runtime.tokenizer import FastTokenizer, load_fast_tokenizer

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, head_dim=16)
IDS = [1, 5, 9, 3, 17, 4, 22, 8, 11]


def _dense(arch: str, folder, **extra):
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[arch]
    tok = make_tokenizer(folder)
    cfg = getattr(transformers, cls)(vocab_size=len(tok), **COMMON, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.uniform_(0.5, 1.5)  # biases and norms visible too
    model.save_pretrained(folder)
    return model.eval()


def _native_like(dense, folder) -> NativeCausalLM:
    c = native_config(json.loads((folder / "config.json").read_text()))
    assert not isinstance(c, str), c
    native = build_native(c)
    missing, unexpected = native.load_state_dict(dense.state_dict(), strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if c.tie_word_embeddings:
        native.lm_head.weight = native.model.embed_tokens.weight
    return native


@pytest.mark.parametrize("arch,extra", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                        ("llama", {"attention_bias": True, "mlp_bias": True}),
                                        ("mistral", {"sliding_window": None}), ("qwen2", {})])
def test_native_model_gives_transformers_logits(arch, extra, tmp_path):
    dense = _dense(arch, tmp_path, **extra)
    native = _native_like(dense, tmp_path)
    assert [n for n, _ in native.named_parameters(remove_duplicate=False)] == \
        [n for n, _ in dense.named_parameters(remove_duplicate=False)]
    want = Stepper(dense, slots=1, max_len=64, capacity=16)
    got = Stepper(native, slots=1, max_len=64, capacity=16)
    a = want.forward(torch.tensor([IDS[:6]]), 0, [0], all_positions=True)
    b = got.forward(torch.tensor([IDS[:6]]), 0, [0], all_positions=True)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    with torch.inference_mode():
        ref = dense(input_ids=torch.tensor([IDS[:6]])).logits.float()
    torch.testing.assert_close(b, ref, rtol=0, atol=2e-5)
    for t in range(6, len(IDS)):  # decode steps
        torch.testing.assert_close(got.forward(torch.tensor([[IDS[t]]]), 0, [t]),
                                   want.forward(torch.tensor([[IDS[t]]]), 0, [t]), rtol=0, atol=1e-5)


def test_native_config_says_why_not():
    base = dict(model_type="llama", vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4)
    assert not isinstance(native_config(base), str)
    cases = {
        "model_type 'gemma2'": dict(base, model_type="gemma2"),
        "hidden_act 'gelu'": dict(base, hidden_act="gelu"),
        "RoPE type 'llama3'": dict(base, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
        "RoPE type 'yarn'": dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
        "sliding-window": dict(base, model_type="mistral"),  # MistralConfig's default window applies
        "partial rotary": dict(base, partial_rotary_factor=0.5),
        "rope_theta=-1": dict(base, rope_theta=-1),
    }
    for want, raw in cases.items():
        why = native_config(raw)
        assert isinstance(why, str) and want in why, (want, why)
    c = native_config(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert c.rope_theta == 5e5 and c.head_dim == 16 and c.num_key_value_heads == 4


def test_native_model_has_no_forward(tiny_llama_dir, tmp_path):
    out = tmp_path / "ck"
    compress(tiny_llama_dir, out, Plan(parse_codec_choice("rtn:bits=4,group_size=32")), progress=False)
    with LazyModel.load(out, RuntimeConfig(skeleton="native")) as lm:
        assert isinstance(lm.model, NativeCausalLM)
        with pytest.raises(RuntimeError, match="skeleton='transformers'"):
            lm.model(input_ids=torch.tensor([[1, 2]]))
        # beyond the context the fast path cannot run, and nothing else can: a clear error
        with pytest.raises(ThawedError, match="--skeleton transformers"):
            next(generate_tokens(lm.model, [1] * 300, SamplingParams(max_new_tokens=2)))


@pytest.mark.parametrize("codec", ["rtn:bits=4,group_size=32", "lossless", "hyperc"])
def test_checkpoint_tokens_equal_with_either_skeleton(codec, tiny_llama_dir, tmp_path):
    out = tmp_path / "ck"
    compress(tiny_llama_dir, out, Plan(parse_codec_choice(codec)), progress=False)
    runs = {}
    for skeleton in ("transformers", "auto"):
        loaded = load_for_inference(out, RuntimeConfig(skeleton=skeleton))
        try:
            assert isinstance(loaded.model, NativeCausalLM) == (skeleton == "auto")
            assert isinstance(loaded.tokenizer, FastTokenizer) == (skeleton == "auto")
            ids = loaded.tokenizer("the capital of france is paris")["input_ids"]
            steps = generate_tokens(loaded.model, ids, SamplingParams(max_new_tokens=12, ignore_eos=True),
                                    loaded.eos_token_ids)
            runs[skeleton] = (ids, [s.token for s in steps], loaded.eos_token_ids)
        finally:
            loaded.close()
    assert runs["auto"] == runs["transformers"]


def test_native_skeleton_asked_for_an_unsupported_model_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    tok = make_tokenizer(src)
    cfg = transformers.Qwen3Config(vocab_size=len(tok), **COMMON)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    out = tmp_path / "ck"
    compress(src, out, Plan(parse_codec_choice("rtn:bits=6,group_size=16")), progress=False)
    with pytest.raises(ConfigError, match="model_type 'qwen3' has no native model.*--skeleton transformers"):
        LazyModel.load(out, RuntimeConfig(skeleton="native"))
    with LazyModel.load(out, RuntimeConfig(skeleton="auto")) as lm:  # auto: transformers' model
        assert not isinstance(lm.model, NativeCausalLM)


TEXTS = ["The capital of France is", " leading space", "Numbers 12345 and 3.14159, punctuation!?",
         "unicode: café, naïve, 日本語, emoji 🙂", "<|im_start|>user\nhi<|im_end|>", "", "tabs\tand\nnewlines  "]


def test_fast_tokenizer_equals_transformers_on_the_real_model(real_model_dir):
    fast = load_fast_tokenizer(real_model_dir)
    assert fast is not None, "the real model's tokenizer should load without transformers"
    ref = AutoTokenizer.from_pretrained(str(real_model_dir))
    assert fast.eos_token_id == ref.eos_token_id
    for text in TEXTS:
        ids = fast(text)["input_ids"]
        assert ids == ref(text, add_special_tokens=True)["input_ids"], text
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


def test_fast_tokenizer_equals_transformers_on_the_test_tokenizer(tiny_llama_dir):
    fast, ref = load_fast_tokenizer(tiny_llama_dir), AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    assert fast is not None and fast.eos_token_id == ref.eos_token_id
    text = "the capital of france is paris </s> unknownword"
    ids = fast(text)["input_ids"]
    assert ids == ref(text)["input_ids"]
    assert fast.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_fast_tokenizer_declines_what_transformers_would_change(tiny_llama_dir, tmp_path):
    import shutil

    for change in ({"add_bos_token": True}, {"tokenizer_class": "LlamaTokenizerFast"},
                   {"clean_up_tokenization_spaces": True}, {"eos_token": "<not-a-token>"}):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(tiny_llama_dir, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**cfg, **change}))
        assert load_fast_tokenizer(d) is None, change
    (d / "tokenizer.json").write_text("{not json")
    assert load_fast_tokenizer(d) is None


def test_generate_cli_runs_without_importing_transformers(tiny_llama_dir, tmp_path):
    out = tmp_path / "ck"
    compress(tiny_llama_dir, out, Plan(parse_codec_choice("rtn:bits=4,group_size=32")), progress=False)
    code = ("import sys, io, contextlib\n"
            "from thawed.runtime.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            f"    rc = main(['generate', {str(out)!r}, 'the capital of', '--max-new-tokens', '4'] + sys.argv[1:])\n"
            "print(rc, 'transformers' in sys.modules, repr(buf.getvalue()))\n")
    runs = {}
    for flags in ([], ["--skeleton", "transformers"]):
        res = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        rc, imported, text = res.stdout.strip().splitlines()[-1].split(" ", 2)
        runs[bool(flags)] = (rc, imported, text)
    assert runs[False][:2] == ("0", "False")  # native: transformers never imported
    assert runs[True][:2] == ("0", "True")
    assert runs[False][2] == runs[True][2]  # and the same text
