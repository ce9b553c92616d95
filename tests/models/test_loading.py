"""Model and tokenizer loading: pad token, vocabulary, dtype choice, checkpointing, built-ins."""

import torch
from transformers import AutoTokenizer

from rufus.models.loading import PAD_TOKEN, load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path
from tests.helpers import make_tiny_model_dir


def test_tokenizer_without_pad_gets_a_dedicated_pad_and_model_grows(tmp_path):
    path = make_tiny_model_dir(tmp_path / "m", pad_token=None)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    tok = load_tokenizer(str(path))
    assert tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id != tok.eos_token_id
    model = load_causal_lm(str(path), tokenizer=tok)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    out = model(input_ids=torch.tensor([[tok.pad_token_id, tok.eos_token_id]]))
    assert torch.isfinite(out.logits).all()


def test_existing_pad_token_is_kept(tiny_model):
    path = tiny_model
    tok = load_tokenizer(str(path))
    assert tok.pad_token == "<pad>" and len(tok) == len(AutoTokenizer.from_pretrained(path))


def test_dtype_resolution():
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)


def test_weights_dtype_and_gradient_checkpointing_give_the_same_gradients(tiny_model):
    path = str(tiny_model)
    ids = torch.tensor([[1, 5, 9, 30, 41, 2]])
    grads = []
    for ckpt in (False, True):
        model = load_causal_lm(path, gradient_checkpointing=ckpt)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(model.get_input_embeddings().weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert load_causal_lm(path, dtype=torch.bfloat16).get_input_embeddings().weight.dtype == torch.bfloat16


def test_builtin_model_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RUFUS_CACHE", str(tmp_path))
    first = resolve_model_path("builtin:tiny-llama")
    assert (tmp_path / "builtin").exists() and first.startswith(str(tmp_path))
    mtime = (tmp_path / "builtin" / "tiny-llama-v1" / "config.json").stat().st_mtime
    assert resolve_model_path("builtin:tiny-llama") == first
    assert (tmp_path / "builtin" / "tiny-llama-v1" / "config.json").stat().st_mtime == mtime
    tok = load_tokenizer("builtin:tiny-llama")
    assert tok.chat_template and tok.eos_token == "</s>"
