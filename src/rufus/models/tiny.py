"""Tiny models and tokenizers built locally: for tests, examples and the offline demo.

Nothing here downloads anything. A byte-level BPE tokenizer is trained with `tokenizers` on text
the caller provides, and a small transformers architecture (Llama by default) is built from a
config with random weights. The result is an ordinary Hugging Face model directory, so every code
path that loads real models (`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer`) is the one
exercised.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

# A Zephyr-style chat template: bos, then each turn is "<|role|>\n" + content + eos. Rendering a conversation
# prefix with add_generation_prompt=True is a string prefix of rendering the longer conversation,
# which the data layer relies on to find assistant spans.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    *,
    pad_token: str | None = "<pad>",
    add_bos: bool = True,
    chat_template: str | None = CHAT_TEMPLATE,
    model_max_length: int = 512,
):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers fast tokenizer.

    `pad_token=None` leaves the tokenizer without a pad token, as many released checkpoints are,
    so the loader's pad-token handling can be tested.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>"] + ([pad_token] if pad_token else []) + ROLE_TOKENS
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if pad_token:
        kwargs["pad_token"] = pad_token
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        additional_special_tokens=list(ROLE_TOKENS),
        **kwargs,
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_tiny_model(
    tokenizer,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    **config_overrides,
):
    """A randomly initialised causal LM sized for tests (tens of thousands of parameters)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=True,
            **common,
            **config_overrides,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_position_embeddings,
            **common,
            **config_overrides,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose 'llama' or 'gpt2'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def build_tiny(path: str | os.PathLike, texts: Iterable[str], *, vocab_size: int = 512, **model_kwargs) -> Path:
    """Train a tokenizer on `texts`, build a tiny model for it, save both to `path`; return `path`."""
    tok_kwargs = {k: model_kwargs.pop(k) for k in ("pad_token", "add_bos", "chat_template") if k in model_kwargs}
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, **tok_kwargs)
    model = make_tiny_model(tokenizer, **model_kwargs)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- built-in models: "builtin:<name>" model specs resolve here ---------------------------------

_WORDS = (
    "the a an is are was be to of and in on for with what how why when where who which can do does "
    "please tell me about explain give list name write short answer question help thanks hello hi "
    "yes no sure here it this that these those one two three four five six seven eight nine ten "
    "sun moon star sky sea river tree cat dog bird fish apple bread water tea coffee book song "
    "red blue green big small fast slow warm cold good kind calm happy sad new old first last "
    "add plus minus times equals number sum capital city country colour color animal food day night"
).split()


def builtin_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """A deterministic English-like corpus for the built-in tokenizer (covers digits and punctuation)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.choices(_WORDS, k=rng.randint(3, 12))
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99)))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return lines


BUILTIN_MODELS = {
    # name: keyword arguments for build_tiny
    "tiny-llama": dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4, vocab_size=512),
    "small-llama": dict(arch="llama", hidden_size=256, num_layers=4, num_heads=8, vocab_size=2048),
}
_BUILTIN_VERSION = "v1"


def cache_dir() -> Path:
    return Path(os.environ.get("RUFUS_CACHE", Path.home() / ".cache" / "rufus"))


# `builtin:playground-base`, the playground's pretrained base model. `playground.base` builds it (an
# upper layer: it trains with the SFT trainer); its place in the cache is fixed here, low enough for
# the model loader to find it. Bump the version when the recipe in `playground.base` changes, so
# stale caches are not reused.
PLAYGROUND_BASE = "builtin:playground-base"
PLAYGROUND_BASE_VERSION = "v3"


def playground_base_dir(seed: int = 0) -> Path:
    """Where the playground base model of `seed` is cached (it may not be built yet)."""
    return cache_dir() / "playground" / f"base-{PLAYGROUND_BASE_VERSION}-seed{seed}"


def builtin_model_path(name: str) -> Path:
    """Path of the built-in model `name`, building and caching it on first use."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model 'builtin:{name}'; available: {', '.join(sorted(BUILTIN_MODELS))}")
    path = cache_dir() / "builtin" / f"{name}-{_BUILTIN_VERSION}"
    if (path / "config.json").exists():
        return path
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    build_tiny(tmp, builtin_corpus(), **dict(BUILTIN_MODELS[name]))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path
