"""The command line: help lists keys, errors name the key, a run goes end to end."""

import pytest
import yaml

from rufus.cli import main
from rufus.config import load_config
from rufus.trainers.sft import SFTConfig
from tests.helpers import sft_rows, write_jsonl


def test_help_lists_every_key(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("model", "data.train", "lora.target_modules", "grad_accum", "dtype"):
        assert f"\n  {key} " in out
    assert main(["rm", "--help"]) == 0
    assert "\n  rm.loss " in capsys.readouterr().out


def test_bad_key_is_an_error_naming_it(capsys):
    assert main(["sft", "model=m", "data.train=x.jsonl", "bacth_size=4"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bacth_size'" in err and "did you mean 'batch_size'" in err


def test_missing_data_file_is_an_error(capsys, tmp_path, tiny_model):
    model = tiny_model
    assert (
        main(["sft", f"model={model}", f"data.train={tmp_path / 'nope.jsonl'}", f"output_dir={tmp_path / 'out'}"]) == 2
    )
    assert "nope.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_cli_run_writes_config_metrics_and_final(capsys, tmp_path, tiny_model):
    model = tiny_model
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(4))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "data": {"train": str(data), "max_length": 40},
                "batch_size": 4,
                "max_steps": 50,
                "lr": 1e-3,
                "progress": False,
            }
        )
    )
    assert main(["sft", "--config", str(cfg), "max_steps=3", f"output_dir={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    assert "finished at step 3" in out and "loss" in out
    saved = load_config(SFTConfig, tmp_path / "out" / "config.yaml")
    assert saved.max_steps == 3 and saved.data.train == str(data)  # override won over the YAML
    assert (tmp_path / "out" / "final" / "config.json").exists()


@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "grpo", "rloo", "dpo", "kto", "ilql", "bon", "pipeline"])
def test_shipped_configs_are_valid(command):
    from rufus.cli import _load

    cls, _ = _load(command)
    cfg = load_config(cls, f"configs/{command}_tiny.yaml")
    assert cfg.model.startswith("builtin:")


def test_every_command_has_help(capsys):
    from rufus.cli import COMMANDS

    for command in COMMANDS:
        assert main([command, "--help"]) == 0, command
        assert "config keys" in capsys.readouterr().out


def test_classic_command_runs_an_agent_and_lists_its_keys(tmp_path, capsys):
    """`rufus classic <algo> key=value ...`: the same config system; outputs and a summary."""
    from rufus.cli import main

    assert (
        main(
            [
                "classic",
                "q_learning",
                "env=FrozenLake-v1",
                "slippery=false",
                "total_steps=3000",
                f"output_dir={tmp_path / 'q'}",
                "progress=false",
                "eval_episodes=10",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "rufus classic q_learning" in printed and "greedy_success_rate" in printed
    assert (tmp_path / "q" / "metrics.jsonl").exists() and (tmp_path / "q" / "agent.pt").exists()
    assert (tmp_path / "q" / "plots" / "episodic_return.png").exists()
    assert main(["classic", "ppo", "--help"]) == 0
    assert "clip_coef" in capsys.readouterr().out
    assert main(["classic", "dqn", "no_such_key=1", f"output_dir={tmp_path / 'd'}"]) == 2
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sft", "lr=-1"], "lr: must be > 0, got -1.0"),
        (["sft", "batch_size=0"], "batch_size: must be >= 1, got 0"),
        (["grpo", "grpo.group_size=1"], "grpo.group_size: must be >= 2, got 1"),
        (["rloo", "rloo.group_size=1"], "rloo.group_size: must be >= 2, got 1"),
        (["rloo", "rloo.k=1"], "unknown key 'rloo.k': it was renamed; use 'rloo.group_size' (int, >= 2)"),
        (["dpo", "dpo.label_smoothing=0.7"], "dpo.label_smoothing: must be in [0, 0.5], got 0.7"),
        (["kto", "kto.beta=0"], "kto.beta: must be > 0, got 0.0"),
        (
            ["kto", "batch_size=1"],
            "batch_size: KTO estimates its reference point z0 on mismatched rows of a batch "
            "(a prompt with another row's completion), so a batch needs at least 2 rows, got 1",
        ),
        (["sft", "model=/does/not/exist"], "model: /does/not/exist: no such directory, and not a hub id"),
        (["ppo", "critic.model=/does/not/exist"], "critic.model: /does/not/exist: no such directory, and not a hub id"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_status_2(capsys, tmp_path, tiny_model, argv, message):
    """Before any data or model loads: the data file does not exist either, and the output_dir
    stays unwritten."""
    command, *overrides = argv
    common = [f"model={tiny_model}", f"data.train={tmp_path / 'missing.jsonl'}", f"output_dir={tmp_path / 'out'}"]
    assert main([command, *common, *overrides]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"rufus {command}: error: {message}"]
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, key",
    [
        (["eval", "model={model}", "baseline=/does/not/exist", "prompts=p.jsonl"], "baseline"),
        (["generate", "model=/does/not/exist", "prompt=hi"], "model"),
        (["eval-rm", "model=/does/not/exist", "data=d.jsonl"], "model"),
        (["pipeline", "model=/does/not/exist", "output_dir={tmp}/p"], "model"),
        (["studio", "new-round", "--db", "{tmp}/s.db", "--name", "r", "--prompts", "p.jsonl", "--models",
          "{model}", "/does/not/exist"], "models"),
    ],
)  # fmt: skip
def test_a_missing_model_directory_is_one_line_for_every_command(capsys, tmp_path, tiny_model, argv, key):
    argv = [a.format(model=tiny_model, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    label = " ".join(argv[:2]) if argv[0] == "studio" else argv[0]
    assert err.splitlines() == [f"rufus {label}: error: {key}: /does/not/exist: no such directory, and not a hub id"]
    assert not (tmp_path / "p").exists() and not (tmp_path / "s.db").exists()


def test_help_shows_the_valid_ranges(capsys):
    assert main(["grpo", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def line(key):
        return next(ln for ln in lines if ln.split() and ln.split()[0] == key)

    assert line("lr").endswith("(> 0)") and line("grpo.group_size").endswith("(>= 2)")
    assert line("generation.top_p").endswith("(in (0, 1])") and line("kl.coef").endswith("(>= 0)")
    assert main(["classic", "dqn", "--help"]) == 0
    assert any(ln.split()[:1] == ["tau"] and ln.endswith("(in (0, 1])") for ln in capsys.readouterr().out.splitlines())


def test_the_20b_recipe_runs_its_settings_on_a_tiny_model(tmp_path, tiny_model):
    # configs/ppo_20b_24gb.yaml with the 20B base swapped for the tiny model and two short steps: the
    # recipe's combination (8-bit base, LoRA r=16, shared value head, gradient checkpointing, bfloat16)
    # must run as written
    pytest.importorskip("bitsandbytes", reason="the recipe's 8-bit base needs the quant extra")
    from rufus.trainers.ppo import PPOConfig, train_ppo
    from tests.helpers import arithmetic_prompts

    prompts = write_jsonl(tmp_path / "prompts.jsonl", arithmetic_prompts(8))
    overrides = [
        f"model={tiny_model}",
        f"output_dir={tmp_path / 'out'}",
        f"data.train={prompts}",
        "reward.function=[configs/rewards.py:digit_share]",
        "max_steps=2",
        "grad_accum=1",
        "generation.max_new_tokens=8",
        "progress=false",
    ]
    cfg = load_config(PPOConfig, "configs/ppo_20b_24gb.yaml", overrides)
    assert (cfg.quantization, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == ("8bit", 16, 32, 0.05)
    assert cfg.critic.shared and cfg.gradient_checkpointing and cfg.dtype == "bfloat16"
    result = train_ppo(cfg)
    assert result.steps == 2 and (tmp_path / "out" / "final" / "model.safetensors").exists()
