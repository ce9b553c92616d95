"""Supervised fine-tuning (SFT): next-token likelihood on (prompt, response) demonstrations.

The first stage of the RLHF pipeline (InstructGPT, Ouyang et al. 2022, Sec. 3.5): the pretrained
model imitates demonstrations, the loss counting response tokens only. An explicit loop on
accelerate; one process or many (torchrun) give the same updates for the same global batch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rufus import distributed
from rufus.config import DataSection, LogArgs, LoraSection, ModelArgs, OptimArgs, RunArgs, as_config, opt
from rufus.losses.sft import sft_loss
from rufus.trainers import common

log = logging.getLogger(__name__)


@dataclass
class SFTConfig(LogArgs, OptimArgs, RunArgs, ModelArgs):
    """Supervised fine-tuning on prompt/completion or chat-formatted demonstrations."""

    output_dir: str = opt("runs/sft", "directory for config.yaml, metrics.jsonl, checkpoints/ and final/")
    data: DataSection = opt(DataSection, "training and evaluation data")
    lora: LoraSection = opt(LoraSection, "LoRA adapters (lora.r > 0 turns them on)")


@dataclass
class SFTResult:
    output_dir: Path
    final_dir: Path
    steps: int
    metrics: list[dict]  # every row written to metrics.jsonl by this process (main process only)
    model: object = None  # the trained model (unwrapped; a peft model under LoRA)


def train_sft(config: SFTConfig | dict) -> SFTResult:
    """Run SFT as configured; return where the model went and what was logged."""
    cfg = as_config(SFTConfig, config)
    run = common.start_run(cfg)  # accelerator, seeds, output_dir checks, resume point, config.yaml
    acc = run.accelerator

    # 1. data: load, validate and tokenise everything before any model is loaded
    from rufus.data.loading import load_records
    from rufus.data.readers import options_from
    from rufus.data.sft import SFTCollator, tokenize_sft

    tokenizer = common.load_run_tokenizer(cfg)
    read = options_from(cfg.data, tokenizer)  # how the files are written (detected, or data.format)
    tok_kwargs = dict(
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        truncation=cfg.data.truncation,
        completion_only_loss=cfg.data.completion_only_loss,
    )
    with acc.main_process_first():  # the first process fills the datasets cache, the others read it
        train = tokenize_sft(
            load_records(cfg.data.train, kind="sft", split=cfg.data.train_split, key="data.train", options=read),
            tokenizer,
            key="data.train",
            **tok_kwargs,
        )
        evals = None
        if cfg.data.eval:
            evals = tokenize_sft(
                load_records(cfg.data.eval, kind="sft", split=cfg.data.eval_split, key="data.eval", options=read),
                tokenizer,
                key="data.eval",
                **tok_kwargs,
            )
    collate = SFTCollator(tokenizer.pad_token_id)
    batches = common.BatchPlan(
        len(train), cfg.batch_size, cfg.grad_accum, acc.num_processes, acc.process_index, cfg.seed
    )
    max_steps = cfg.max_steps if cfg.max_steps > 0 else batches.steps_for_epochs(cfg.epochs)
    # the whole optimiser batch's labelled-token count is the loss denominator (see sft_loss)
    label_counts = [sum(1 for t in ex["labels"][1:] if t != -100) for ex in train]

    # 2. model, LoRA, optimiser, schedule
    model = distributed.shard(cfg, acc, common.load_trainable_lm(cfg, tokenizer))  # strategy=fsdp: sharded
    optimizer, scheduler = common.make_optimizer(cfg, model, max_steps)
    model, optimizer = distributed.prepare(acc, model, optimizer)
    start_step, _ = common.maybe_resume(run, acc.unwrap_model(model), optimizer, scheduler)
    logger = common.open_metrics(run, start_step)

    # 3. the loop: one optimiser step per global batch of cfg.batch_size examples
    eval_size = cfg.batch_size // acc.num_processes // cfg.grad_accum  # examples per evaluation forward pass
    progress = common.progress_bar(cfg, acc, max_steps, start_step, desc="sft")
    window = common.Window()
    model.train()
    for step in range(start_step + 1, max_steps + 1):
        t0 = time.perf_counter()
        loss_value, grad_norm, num_tokens = sft_update(
            cfg, acc, model, optimizer, scheduler, train, batches.global_batch(step), batches, collate, label_counts
        )
        window.add(loss=loss_value, grad_norm=grad_norm, time=time.perf_counter() - t0, tokens=num_tokens)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}")

        # 4. log, evaluate, checkpoint
        held_out = (lambda: evaluate(model, evals, collate, acc, eval_size)) if evals else None
        save = (acc.unwrap_model(model), optimizer, scheduler, None)
        epoch = step * cfg.batch_size / len(train)
        common.log_evaluate_save(run, logger, step, max_steps, window, model, held_out, save, epoch=epoch)
    progress.close()

    # 5. the final model, loadable with AutoModelForCausalLM.from_pretrained
    final_dir = common.save_final(run, acc.unwrap_model(model), tokenizer)
    logger.close()
    common.finish_run(run, ["loss", "eval/loss", "lr", "grad_norm"])
    return SFTResult(Path(cfg.output_dir), final_dir, max_steps, logger.rows, acc.unwrap_model(model))


def sft_update(
    cfg,
    acc,
    model,
    optimizer,
    scheduler,
    examples: list[dict],
    global_idx: list[int],
    plan,
    collate,
    label_counts: list[int],
) -> tuple[float, float, int]:
    """One optimiser step of the SFT loss over examples[global_idx]; returns (loss, grad norm, tokens).

    This process runs its share of the batch in grad_accum micro-batches. Each adds its summed NLL
    divided by the whole batch's labelled-token count, so the step equals one over the whole batch
    on any number of processes. `label_counts[i]` is example i's number of labelled tokens.
    """
    num_tokens = sum(label_counts[i] for i in global_idx)
    nll_sum = torch.zeros((), device=acc.device)
    micro = plan.micro_batches(global_idx)
    for k, idx in enumerate(micro):
        batch = {n: t.to(acc.device) for n, t in collate([examples[i] for i in idx]).items()}
        with common.sync_gradients_if(acc, model, last=k == len(micro) - 1), acc.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            # DDP averages gradients over processes, hence / num_processes in the denominator
            loss, stats = sft_loss(logits, batch["labels"], num_tokens=max(num_tokens, 1) / acc.num_processes)
            distributed.backward(acc, model, loss)
        nll_sum += stats["nll_sum"]
    grad_norm = common.clip_and_step(cfg, acc, model, optimizer, scheduler)
    return acc.reduce(nll_sum, reduction="sum").item() / max(num_tokens, 1), grad_norm, num_tokens


@torch.no_grad()
def evaluate(model, examples: list[dict], collate, acc, micro_batch: int) -> dict:
    """Token-level NLL and perplexity over `examples`, shared out across processes."""
    model.eval()
    nll = torch.zeros((), device=acc.device)
    count = torch.zeros((), device=acc.device)
    mine = list(range(acc.process_index, len(examples), acc.num_processes))
    size = max(micro_batch, 1)
    chunks = [mine[start : start + size] for start in range(0, len(mine), size)]
    for idx, real in distributed.lockstep(acc, model, chunks, filler=[0]):
        batch = collate([examples[i] for i in idx])
        batch = {n: t.to(acc.device) for n, t in batch.items()}
        with acc.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        if not real:
            continue
        _, stats = sft_loss(logits, batch["labels"])
        nll += stats["nll_sum"]
        count += stats["num_tokens"]
    nll, count = acc.reduce(nll, reduction="sum").item(), acc.reduce(count, reduction="sum").item()
    loss = nll / max(count, 1)
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}
