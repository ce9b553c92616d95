"""Every published preference data set trains as it is: `rufus rm`, `rufus dpo`, and `rufus sft` where it has
demonstrations, for a few steps on rows written in the published shape (tests/published.py)."""

from __future__ import annotations

import math

import pytest
import torch

from rufus.cli import main
from rufus.trainers.dpo import train_dpo
from rufus.trainers.grpo import train_grpo
from rufus.trainers.reward import train_reward_model
from rufus.trainers.sft import train_sft
from tests import published
from tests.helpers import digit_fraction, with_overrides, write_jsonl

FORMATS = {  # name -> (rows, detected format, kind a reward model trains on, has demonstrations)
    "hh-rlhf": (published.hh_rlhf, "hh-rlhf", "preference", True),
    "ultrafeedback_binarized": (published.ultrafeedback_binarized, "ultrafeedback", "preference", True),
    "ultrafeedback_raw": (published.ultrafeedback_raw, "ultrafeedback", "ranking", True),
    "oasst1": (published.oasst1, "oasst1", "ranking", True),
    "shp": (published.shp, "shp", "preference", True),
    "summarize_from_feedback": (published.summarize_from_feedback, "summarize_from_feedback", "preference", True),
    "helpsteer2": (published.helpsteer2, "helpsteer2", "ranking", True),
    "trl_implicit": (published.trl_implicit, "trl", "preference", False),
}


def config(tiny_model, train, out, **over):
    cfg = {
        "model": str(tiny_model),
        "output_dir": str(out),
        "data": {"train": str(train), "max_length": 256},
        "batch_size": 4,
        "lr": 1e-3,
        "max_steps": 2,
        "dtype": "float32",
        "progress": False,
        "log_every": 1,
    }
    return with_overrides(cfg, over)


def detected(caplog, path) -> list[str]:
    """The 'reading FILE as FORMAT (KIND rows' log lines about `path`."""
    return [
        r.getMessage().split(" as ", 1)[1].split(";")[0]
        for r in caplog.records
        if f"reading {path} as" in r.getMessage()
    ]


@pytest.mark.parametrize("name", list(FORMATS))
def test_trains_rm_dpo_and_sft_as_published(name, tiny_model, tmp_path, caplog):
    caplog.set_level("INFO", logger="rufus.data.loading")
    make, fmt, kind, demonstrations = FORMATS[name]
    train = write_jsonl(tmp_path / f"{name}.jsonl", make())

    rm = train_reward_model(config(tiny_model, train, tmp_path / "rm"))
    assert rm.steps == 2 and all(math.isfinite(row["loss"]) for row in rm.metrics if "loss" in row)
    assert (rm.final_dir / "model.safetensors").exists()

    dpo = train_dpo(config(tiny_model, train, tmp_path / "dpo", **{"dpo.beta": 0.1}))
    losses = [row["dpo/loss"] for row in dpo.metrics if "dpo/loss" in row]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1

    expected = [f"{fmt} ({kind} rows"] + ([f"{fmt} (preference rows"] if kind != "preference" else [])  # once each
    if demonstrations:
        sft = train_sft(config(tiny_model, train, tmp_path / "sft"))
        assert sft.steps == 2 and all(math.isfinite(row["loss"]) for row in sft.metrics if "loss" in row)
        expected.append(f"{fmt} (sft rows")
    assert detected(caplog, train) == expected


def test_helpsteer2_pointwise_warmup_on_a_weighted_mix_then_pairs(tiny_model, tmp_path, caplog):
    caplog.set_level("INFO", logger="rufus.data.loading")
    train = write_jsonl(tmp_path / "hs2.jsonl", published.helpsteer2())
    result = train_reward_model(
        config(
            tiny_model,
            train,
            tmp_path / "rm",
            max_steps=2,
            **{
                "data.attributes": "helpfulness:0.65,correctness:0.8,coherence:0.45,complexity:0.55,verbosity:-0.4",
                "rm.pointwise_data": str(train),
                "rm.pointwise_steps": 2,
                "rm.pointwise_loss": "mse",
            },
        )
    )
    assert [row["stage"] for row in result.metrics if "stage" in row] == ["pointwise"] * 2 + ["pairwise"] * 2
    assert detected(caplog, train) == ["helpsteer2 (ranking rows", "helpsteer2 (graded rows"]


def test_trl_unpaired_rows_warm_up_a_reward_model_and_their_desirable_rows_are_demonstrations(tiny_model, tmp_path):
    kto = write_jsonl(tmp_path / "kto.jsonl", published.trl_unpaired())
    pairs = write_jsonl(tmp_path / "pairs.jsonl", published.trl_implicit())
    result = train_reward_model(
        config(tiny_model, pairs, tmp_path / "rm", **{"rm.pointwise_data": str(kto), "rm.pointwise_steps": 2})
    )
    assert [row["stage"] for row in result.metrics if "stage" in row][:2] == ["pointwise"] * 2
    sft = train_sft(config(tiny_model, kto, tmp_path / "sft"))
    assert sft.steps == 2


def test_margins_from_the_data_enter_the_logistic_loss(tiny_model, tmp_path):
    # One step over every pair with a learning rate too small to move the weights: the logged loss is the
    # loss of the final model's scores, mean over pairs of -log sigmoid(r_c - r_r - m_p), with
    # m_p = rm.margin (0) + rm.margin_scale * (score_chosen - score_rejected) from the UltraFeedback rows.
    from rufus.data.reward import RewardCollator, encode_for_reward
    from rufus.models.loading import load_tokenizer
    from rufus.models.reward import raw_scores

    rows = published.ultrafeedback_binarized(8)
    train = write_jsonl(tmp_path / "uf.jsonl", rows)
    losses = {}
    for from_data in (False, True):
        result = train_reward_model(
            config(
                tiny_model,
                train,
                tmp_path / f"rm{from_data}",
                batch_size=8,
                max_steps=1,
                lr=1e-12,
                **{"rm.margin_from_data": from_data, "rm.margin_scale": 0.5, "rm.normalize": False},
            )
        )
        losses[from_data] = result.metrics[0]["loss"]
    tok = load_tokenizer(str(tiny_model))
    collate = RewardCollator(tok.pad_token_id)
    model = result.model.eval()
    with torch.no_grad():
        sides = []
        for side in ("chosen", "rejected"):
            ids = [encode_for_reward(tok, r[side][:1], r[side][1:]) for r in rows]
            batch = collate(ids)
            sides.append(raw_scores(model, batch["input_ids"], batch["attention_mask"]))
    gap = sides[0] - sides[1]
    margins = torch.tensor([0.5 * (r["score_chosen"] - r["score_rejected"]) for r in rows])
    assert losses[False] == pytest.approx(-torch.nn.functional.logsigmoid(gap).mean().item(), abs=1e-4)
    assert losses[True] == pytest.approx(-torch.nn.functional.logsigmoid(gap - margins).mean().item(), abs=1e-4)
    assert losses[True] > losses[False] + 0.5  # margins of 2.5-3 make the same scores cost more


def test_margin_from_data_without_margins_is_a_config_error(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "hh.jsonl", published.hh_rlhf())
    with pytest.raises(Exception, match=r"rm.margin_from_data: 12 of 12 comparisons in data.train carry no margin"):
        train_reward_model(config(tiny_model, train, tmp_path / "rm", **{"rm.margin_from_data": True}))


def test_cli_trains_hh_rlhf_and_reports_a_bad_row_in_one_line(tiny_model, tmp_path, capsys):
    rows = published.hh_rlhf()
    train = write_jsonl(tmp_path / "hh.jsonl", rows)
    args = ["rm", f"model={tiny_model}", f"data.train={train}", "max_steps=1", "batch_size=4", "progress=false"]
    assert main(args + [f"output_dir={tmp_path / 'ok'}", "data.max_length=256"]) == 0
    capsys.readouterr()
    rows[6]["rejected"] = rows[6]["chosen"]
    write_jsonl(train, rows)
    assert main(args + [f"output_dir={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rufus rm: error: data.train: {train}, line 7, field 'rejected': chosen and rejected are identical"]
    assert main(args + [f"output_dir={tmp_path / 'skip'}", "data.invalid_rows=skip", "data.max_length=256"]) == 0


def test_rl_takes_the_prompts_of_a_published_preference_file(tiny_model, tmp_path, caplog):
    caplog.set_level("INFO", logger="rufus.data.loading")
    train = write_jsonl(tmp_path / "shp.jsonl", published.shp())
    result = train_grpo(
        config(tiny_model, train, tmp_path / "grpo", **{"grpo.group_size": 2, "generation.max_new_tokens": 4}),
        reward_fn=digit_fraction,
    )
    assert result.steps == 2
    assert detected(caplog, train) == ["shp (prompt rows"]
