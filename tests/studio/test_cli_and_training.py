"""`rufus studio` on the command line, rounds sampled from models, and exported files training
`rufus rm` (preference and ranking), `rufus sft` (better answers) and `rufus kto` as they are."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from rufus.cli import main
from rufus.studio import rounds as R
from rufus.studio.db import Response, open_database
from tests.helpers import WORDS, make_tiny_model_dir, write_jsonl


def test_cli_round_annotator_and_export(tmp_path, capsys):
    rows = [
        {"prompt": f"what is {i} ?", "responses": [f" yes {i} .", f" no {i} ."], "models": ["good", "bad"]}
        for i in range(6)
    ]
    responses = write_jsonl(tmp_path / "responses.jsonl", rows)
    db = str(tmp_path / "studio.db")
    assert (
        main(
            ["studio", "new-round", "--db", db, "--name", "r", "--responses", str(responses), "--labels-per-item", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "6 pairwise items" in out and "admin login" in out
    assert (
        main(["studio", "add-annotator", "ann", "--db", db, "--round", "r", "--url-base", "http://127.0.0.1:9000"]) == 0
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("http://127.0.0.1:9000/login?token=") and len(last.split("=", 1)[1]) >= 40
    # the person labels (through the library here; the pages are tested elsewhere): "yes" wins
    database, _ = open_database(db)
    from rufus.studio.auth import user_for_token

    with database.session() as s:
        uid = user_for_token(s, last.split("=", 1)[1]).id
    while (aid := R.next_assignment(database, uid, "r")) is not None:
        view = R.view_assignment(database, uid, aid)
        R.submit_label(database, uid, aid, {"choice": next(k for k, t in view.responses if "yes" in t)})
    out_file = tmp_path / "prefs.jsonl"
    assert (
        main(
            [
                "studio",
                "export",
                "--db",
                db,
                "--round",
                "r",
                "--format",
                "preference",
                "--out",
                str(out_file),
                "--with-models",
            ]
        )
        == 0
    )
    exported = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(exported) == 6 and all("yes" in r["chosen"] and r["chosen_model"] == "good" for r in exported)


def test_cli_errors_name_the_problem(tmp_path, capsys):
    db = str(tmp_path / "s.db")
    assert main(["studio", "new-round", "--db", db, "--name", "r"]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert main(["studio", "new-round", "--db", db, "--name", "r", "--prompts", "p.jsonl"]) == 2
    assert "--models" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", 3]}])
    assert main(["studio", "new-round", "--db", db, "--name", "r", "--responses", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 1" in err and "responses[1]" in err
    assert main(["studio", "export", "--db", str(tmp_path / "none.db"), "--round", "r", "--out", "x.jsonl"]) == 2
    assert "no studio database" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an unknown flag: argparse names it
        main(["studio", "new-round", "--db", db, "--name", "r", "--taks", "x"])
    assert "unrecognized arguments: --taks" in capsys.readouterr().err


def test_a_round_sampled_from_two_models(tiny_model, tmp_path, capsys):
    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"what is {i} ?"} for i in range(3)])
    db = str(tmp_path / "s.db")
    assert (
        main(
            [
                "studio",
                "new-round",
                "--db",
                db,
                "--name",
                "m",
                "--task",
                "ranking",
                "--prompts",
                str(prompts),
                "--models",
                str(tiny_model),
                str(other),
                "--samples-per-model",
                "2",
                "--progress",
                "false",
                "generation.max_new_tokens=6",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    database, _ = open_database(db)
    with database.session() as s:
        responses = list(s.scalars(select(Response)))
    assert len(responses) == 3 * 2 * 2
    assert sorted({r.model for r in responses}) == sorted([str(tiny_model), str(other)])
    assert sorted(r.sample for r in responses if r.model == str(tiny_model))[:2] == [0, 0]
    assert all(isinstance(r.content, str) for r in responses)


def yes_no_round(db, task, n, seed=0):
    """n prompts with a "yes" and a "no" response (and, for rankings, a neutral one)."""
    import random

    rng = random.Random(seed)
    filler = [w for w in WORDS if w not in ("yes", "no")]
    cands = []
    for i in range(n):

        def words(extra):
            body = rng.choices(filler, k=rng.randint(2, 5)) + extra
            rng.shuffle(body)
            return " " + " ".join(body) + " ."

        responses = [words(["yes"]), words(["no"])] + ([words([])] if task == "ranking" else [])
        cands.append(R.Candidate(f"what is {i % 10} ?", responses))
    R.create_round(db, "train-" + task, task, cands)


def oracle_labels(db, uid, round_name):
    """A person who likes "yes" and dislikes "no", and writes a better answer every third item."""
    k = 0
    while (aid := R.next_assignment(db, uid, round_name)) is not None:
        view = R.view_assignment(db, uid, aid)
        value = {letter: ("yes" in t.split()) - ("no" in t.split()) for letter, t in view.responses}
        if view.task == "pairwise":
            form = {"choice": max(value, key=value.get)}
        else:
            order = sorted(value, key=lambda letter: -value[letter])
            form = {f"rank_{letter}": str(order.index(letter) + 1) for letter in value}
        if k % 3 == 0:
            form["better_answer"] = " yes yes ."
        R.submit_label(db, uid, aid, form)
        k += 1


@pytest.mark.parametrize("task,fmt", [("pairwise", "preference"), ("ranking", "ranking")])
def test_exports_train_a_reward_model_and_sft(tiny_model, tmp_path, task, fmt):
    from rufus.report.metrics import read_metrics
    from tests.studio.conftest import add_people

    db, _ = open_database(tmp_path / "s.db")
    yes_no_round(db, task, 32)
    ((uid, _),) = add_people(db, "ann").values()
    oracle_labels(db, uid, "train-" + task)
    prefs = tmp_path / f"{fmt}.jsonl"
    demos = tmp_path / "sft.jsonl"
    for name, out in ((fmt, prefs), ("sft", demos)):
        assert (
            main(
                [
                    "studio",
                    "export",
                    "--db",
                    str(tmp_path / "s.db"),
                    "--round",
                    "train-" + task,
                    "--format",
                    name,
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    rm_dir, sft_dir = tmp_path / "rm", tmp_path / "sft"
    assert (
        main(
            [
                "rm",
                f"model={tiny_model}",
                f"output_dir={rm_dir}",
                f"data.train={prefs}",
                "data.max_length=48",
                "batch_size=16",
                "lr=3e-3",
                "max_steps=24",
                "dtype=float32",
                "progress=false",
                "log_every=10",
            ]
        )
        == 0
    )
    rows = read_metrics(rm_dir / "metrics.jsonl")
    accuracy = [r["rm/train_accuracy"] for r in rows if "rm/train_accuracy" in r]
    assert accuracy[-1] > 0.8  # the taste in the labels is learnt: "yes" over "no"
    assert (rm_dir / "final" / "config.json").exists()
    assert (
        main(
            [
                "sft",
                f"model={tiny_model}",
                f"output_dir={sft_dir}",
                f"data.train={demos}",
                "data.max_length=32",
                "batch_size=8",
                "lr=3e-3",
                "max_steps=10",
                "dtype=float32",
                "progress=false",
                "log_every=5",
            ]
        )
        == 0
    )
    losses = [r["loss"] for r in read_metrics(sft_dir / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]


def test_a_kto_export_trains_rufus_kto(tiny_model, tmp_path, capsys):
    """Pairwise labels -> `studio export --format kto` (winner desirable, loser undesirable) -> `rufus kto`."""
    from rufus.report.metrics import read_metrics
    from tests.studio.conftest import add_people

    db, _ = open_database(tmp_path / "s.db")
    yes_no_round(db, "pairwise", 16)
    ((uid, _),) = add_people(db, "ann").values()
    oracle_labels(db, uid, "train-pairwise")
    out = tmp_path / "kto.jsonl"
    args = ["studio", "export", "--db", str(tmp_path / "s.db"), "--round", "train-pairwise", "--format", "kto"]
    assert main([*args, "--out", str(out)]) == 0
    assert "wrote 32 kto rows" in capsys.readouterr().out  # 16 labels, a winner and a loser each
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(("yes" in r["completion"].split()) == r["label"] for r in rows)
    run = tmp_path / "kto"
    common = [f"model={tiny_model}", f"output_dir={run}", f"data.train={out}", "data.max_length=48"]
    assert main(["kto", *common, "batch_size=8", "max_steps=2", "dtype=float32", "progress=false"]) == 0
    metrics = read_metrics(run / "metrics.jsonl")
    # pi == pi_ref at the first step: r = 0, z0 = 0, every row's loss 1 - 1/2
    assert [r["step"] for r in metrics] == [1, 2] and metrics[0]["kto/loss"] == pytest.approx(0.5, abs=1e-6)
    assert (run / "final" / "config.json").exists()
