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


@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "grpo", "rloo", "dpo", "bon", "pipeline"])
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
