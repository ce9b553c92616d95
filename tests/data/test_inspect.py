"""`rufus data inspect`: the detected format, counts, rejected rows with their lines, token lengths, examples."""

from __future__ import annotations

import json

from rufus.cli import main
from rufus.data.inspect import format_report, inspect_data, percentiles
from rufus.models.loading import load_tokenizer
from tests import published


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_percentiles_are_nearest_rank():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}


def test_hh_rlhf_with_rejected_rows_lengths_and_examples(tiny_model, tmp_path):
    rows = published.hh_rlhf(10)
    rows[2]["rejected"] = rows[2]["chosen"]
    rows[5]["rejected"] = rows[5]["chosen"]
    rows[7]["chosen"] = "no dialogue here"
    path = write(tmp_path / "hh.jsonl", rows)
    report = inspect_data({"file": path, "tokenizer": str(tiny_model), "examples": 1})
    assert (report["format"], report["detected"], report["kind"]) == ("hh-rlhf", True, "preference")
    assert (report["rows_read"], report["rows"], report["rejected"]) == (10, 7, 3)
    assert report["reasons"] == [
        ("chosen and rejected are identical", 2),
        ("not an hh-rlhf dialogue: it does not start with '\\n\\nHuman:'", 1),
    ]
    assert [r.split(", field")[0] for r in report["rejected_rows"]] == [f"file: {path}, line {n}" for n in (3, 6, 8)]
    # lengths: the chat template renders each prompt, the answers follow with eos (tiny model has a template)
    tok = load_tokenizer(str(tiny_model))
    good = [r for k, r in enumerate(rows) if k not in (2, 5, 7)]
    prompt_lengths = []
    for r in good:
        text = r["chosen"].rsplit("\n\nAssistant:", 1)[0]
        turns = [t.split(":", 1)[1].strip() for t in text.split("\n\n")[1:]]
        messages = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_lengths.append(len(tok(rendered, add_special_tokens=False)["input_ids"]))
    assert report["lengths"]["prompt"] == percentiles(prompt_lengths)
    assert set(report["lengths"]) == {"prompt", "chosen", "rejected", "total"}
    example = report["examples"][0]
    assert example["where"] == f"{path}, line 1"
    assert example["prompt"].startswith("<s><|user|>") and example["prompt"].endswith("<|assistant|>\n")
    assert example["chosen"].startswith("The moon has 0 facts") and example["chosen"].endswith("</s>")
    text = format_report(report)
    assert f"{path}: hh-rlhf (detected from its columns), read as preference rows" in text
    assert "     2  chosen and rejected are identical" in text


def test_oasst1_without_a_tokenizer_and_the_command_line(tmp_path, capsys):
    path = write(tmp_path / "oasst.jsonl", published.oasst1(3))
    report = inspect_data({"file": path, "lang": ["en"], "kind": "sft"})
    assert (report["format"], report["kind"], report["rows_read"], report["rows"]) == ("oasst1", "sft", 24, 2)
    assert report["filtered"] == 7 and report["rejected"] == 0 and "lengths" not in report
    assert report["examples"][0]["messages"][0] == {"role": "user", "content": "What about the moon?"}
    assert main(["data", "inspect", path, "format=oasst1"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: oasst1 (data.format), read as ranking rows" in out and "rows read        24" in out
    assert main(["data", "inspect", str(tmp_path / "missing.jsonl")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"rufus data inspect: error: file: {tmp_path / 'missing.jsonl'}: file not found"
    )
