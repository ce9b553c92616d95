"""The critic: a value head on a transformer backbone, V(x, y_<t) at every position.

Built from `AutoModelForSequenceClassification(num_labels=1)` so that initialising from a trained
reward model keeps its head (N+ implementation details D22: start the value network from the RM)
and initialising from the policy gets a fresh head, zeroed (N implementation details #11). The
backbone runs once and the head is applied to every position, unlike the reward model, which
reads only the last real token. Saved, it loads back as a sequence classifier.
"""

from __future__ import annotations

import torch

from rufus.models.reward import head_module_names, load_reward_model
from rufus.rollout.logprobs import position_ids_from_mask


class ValueModel(torch.nn.Module):
    """Wraps a sequence classifier; forward gives (B, T) values instead of a pooled score."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def _parts(self):
        model = self.classifier
        if hasattr(model, "get_base_model"):  # peft: adapters are injected in place
            model = model.get_base_model()
        return model.base_model, getattr(model, head_module_names(model)[0])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        backbone, head = self._parts()
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return head(hidden).squeeze(-1).float()  # (B, T)

    def save_pretrained(self, path, **kwargs):
        self.classifier.save_pretrained(path, **kwargs)


def load_value_model(
    name: str,
    *,
    tokenizer,
    from_reward_model: bool,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    compute_dtype: torch.dtype | None = None,
    compile: bool = False,
    quantization: str = "none",
) -> ValueModel:
    """A critic from `name`: a reward model (head kept) or a policy checkpoint (new head, zeros).

    Loads in float32; `compute_dtype`, `attn_implementation`, `compile` and `quantization` (the
    backbone's linear layers; LoRA then trains on it) as in `load_reward_model`."""
    classifier = load_reward_model(
        name,
        tokenizer=tokenizer,
        trust_remote_code=trust_remote_code,
        gradient_checkpointing=gradient_checkpointing,
        attn_implementation=attn_implementation,
        compute_dtype=compute_dtype,
        compile=compile,
        quantization=quantization,
    )
    if not from_reward_model:
        head = getattr(classifier, head_module_names(classifier)[0])
        with torch.no_grad():
            head.weight.zero_()
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
    return ValueModel(classifier)


def load_critic(name: str, *, tokenizer, lora=None, trust_remote_code: bool = False, **load_kwargs) -> ValueModel:
    """PPO's critic from `name`, ready to train: a reward model (its architecture ends in
    ForSequenceClassification) keeps its head, any other checkpoint gets a zero head; dropout off (the
    values of the rollout and of the update's first pass agree); LoRA adapters with the head trained in
    full when `lora.r` > 0. `load_kwargs` as `load_value_model`."""
    from transformers import AutoConfig

    from rufus.config import ConfigError
    from rufus.models.loading import apply_lora, resolve_model_path, set_dropout

    arch = AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code).architectures
    from_rm = any(a.endswith("ForSequenceClassification") for a in arch or [])
    critic = load_value_model(
        name, tokenizer=tokenizer, from_reward_model=from_rm, trust_remote_code=trust_remote_code, **load_kwargs
    )
    if critic.classifier.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ConfigError(f"critic.model: {name} has a smaller vocabulary than the policy's tokenizer")
    set_dropout(critic, 0.0)
    if lora is not None and lora.r > 0:
        critic = ValueModel(
            apply_lora(
                critic.classifier, lora, task_type="SEQ_CLS", modules_to_save=head_module_names(critic.classifier)
            )
        )
    return critic


def values_at_response(
    critic, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
) -> torch.Tensor:
    """(B, A) V_t: the value at the position that emits response token t (position P - 1 + t)."""
    return critic(input_ids, attention_mask)[:, prompt_length - 1 : -1]


class SharedActorCritic(torch.nn.Module):
    """Policy and value head on one backbone (`critic.shared`): one forward gives both.

    Halves the memory of a separate critic, at the price of the policy and value losses pulling
    on the same weights (separate networks usually do better; 37 PPO details #13). The value head
    starts at zero. Generation and adapter switching go to the policy.
    """

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        hidden = policy.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        kwargs.pop("use_cache", None)
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            **kwargs,
        )
        out["values"] = self.value_head(out.hidden_states[-1]).squeeze(-1).float()  # (B, T)
        return out

    def generate(self, *args, **kwargs):
        return self.policy.generate(*args, **kwargs)

    def disable_adapter(self):
        return self.policy.disable_adapter()


def save_critic(critic, directory) -> None:
    """PPO's final critic: a ValueModel in Hugging Face format (`from_pretrained` loads it as a reward
    model), or a shared actor-critic's value head alone (value_head.safetensors)."""
    from pathlib import Path

    from safetensors.torch import save_file

    if isinstance(critic, SharedActorCritic):
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(critic.value_head.state_dict(), Path(directory) / "value_head.safetensors")
    else:
        critic.save_pretrained(directory)
