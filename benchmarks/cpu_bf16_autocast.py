"""Where does bf16 autocast pay off on this CPU? Training-step time, float32 vs bf16 autocast.

Decides the CPU rule behind `dtype=auto` (models/loading.py: resolve_dtype). Prints one row per
model width: milliseconds per forward+backward+AdamW step for a Llama-shaped model.

    .venv/bin/python benchmarks/cpu_bf16_autocast.py
"""

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def step_ms(hidden: int, layers: int, autocast: bool, batch: int = 8, seq: int = 128, reps: int = 5) -> float:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=seq,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 2048, (batch, seq))
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:  # first step warms up
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


if __name__ == "__main__":
    print(f"{'hidden':>6} {'layers':>6} {'fp32 ms':>9} {'bf16 ms':>9} {'speed-up':>8}")
    for hidden, layers in [(64, 2), (128, 2), (256, 4), (512, 4), (768, 6)]:
        a, b = step_ms(hidden, layers, False), step_ms(hidden, layers, True)
        print(f"{hidden:>6} {layers:>6} {a:>9.1f} {b:>9.1f} {a / b:>8.2f}")
