"""Calibration text from every accepted source, and the errors a user sees when a source cannot give text."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import tiny_model
from hf_subprune.calibration import CalibrationError, builtin_text, fingerprint, load_texts, token_blocks

SENTENCES = ["The cat sat on the mat, and then it slept.", "Dogs bark; birds sing.", "One, two, three, four."]


def _rows() -> list[dict]:
    return [{"label": i, "text": t} for i, t in enumerate(SENTENCES)]


def test_txt_is_one_text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\ufefffirst paragraph\n\nsecond paragraph, with a comma\n", encoding="utf-8")
    assert load_texts(path) == ["first paragraph\n\nsecond paragraph, with a comma\n"]
    assert load_texts(str(path)) == load_texts(path)


def test_json_array_of_records(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(_rows()))
    assert load_texts(path) == SENTENCES


def test_json_array_of_strings(tmp_path):
    path = tmp_path / "calib.json"
    path.write_text(json.dumps(SENTENCES))
    texts = load_texts(path)
    assert texts == SENTENCES
    assert not any(c in "".join(texts) for c in '[]"')


def test_jsonl(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    assert load_texts(path) == SENTENCES


def test_csv_with_label_first_and_quoted_commas(tmp_path):
    path = tmp_path / "calib.csv"
    path.write_text("label,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(SENTENCES)))
    assert load_texts(path) == SENTENCES


def test_csv_empty_cells_are_skipped(tmp_path):
    path = tmp_path / "calib.csv"
    path.write_text('label,text\n0,\n1,"a, b"\n2,""\n3,c\n')
    assert load_texts(path) == ["a, b", "c"]


def test_tsv_keeps_quotes_and_commas(tmp_path):
    path = tmp_path / "calib.tsv"
    path.write_text('sentence\tlabel\n"hi," she said\t1\nplain, text\t0\n')
    assert load_texts(path) == ['"hi," she said', "plain, text"]


def test_parquet(tmp_path):
    path = tmp_path / "calib.parquet"
    datasets.Dataset.from_list(_rows()).to_parquet(str(path))
    assert load_texts(path) == SENTENCES


@pytest.mark.parametrize("columns, expected", [
    ({"id": [1], "label": [0], "prompt": ["from prompt"]}, "from prompt"),
    ({"label": [0], "question": ["from question"], "sentence": ["from sentence"]}, "from sentence"),
    ({"content": ["from content"], "text": ["from text"]}, "from text"),
    ({"idx": [3], "document": ["from document"]}, "from document"),
])
def test_text_column_is_found_by_name(columns, expected):
    assert load_texts(datasets.Dataset.from_dict(columns)) == [expected]


def test_explicit_text_column(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "not this", "body": "this one"}\n{"text": "nor this", "body": "and this"}\n')
    assert load_texts(path, text_column="body") == ["this one", "and this"]


def test_dataset_objects_and_lists():
    ds = datasets.Dataset.from_dict({"label": [0, 1, 2, 3], "text": ["a", "", "b", "c"]})
    assert load_texts(ds) == ["a", "b", "c"]
    assert load_texts(ds, max_texts=2) == ["a", "b"]
    assert load_texts(ds.to_iterable_dataset(), max_texts=2) == ["a", "b"]
    assert load_texts(datasets.DatasetDict(train=ds, test=ds.select([3])), split="test") == ["c"]
    assert load_texts(["x", " ", "y"]) == ["x", "y"]
    assert load_texts() == load_texts("builtin") == [builtin_text()]


def test_split_and_streaming_on_a_local_file(tmp_path):
    path = tmp_path / "calib.csv"
    path.write_text("label,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(SENTENCES)))
    assert load_texts(path, split="train[1:]") == SENTENCES[1:]
    assert load_texts(path, streaming=True, max_texts=2) == SENTENCES[:2]


def test_missing_column_lists_the_columns():
    ds = datasets.Dataset.from_dict({"label": [0], "text": ["a"]})
    with pytest.raises(CalibrationError, match=r"no column 'body'.*\['label', 'text'\]"):
        load_texts(ds, text_column="body")


def test_no_text_column_says_to_name_one(tmp_path):
    path = tmp_path / "calib.csv"
    path.write_text("id,label,body\n1,0,hello\n")
    with pytest.raises(CalibrationError) as info:
        load_texts(path)
    assert "['id', 'label', 'body']" in str(info.value) and "--text-column" in str(info.value)


def test_label_column_is_not_text(tmp_path):
    path = tmp_path / "calib.csv"
    path.write_text("label,text\n1,hello\n")
    with pytest.raises(CalibrationError, match="row 1 of column 'label'.*not text"):
        load_texts(path, text_column="label")


@pytest.mark.parametrize("second", ['{"other": 1}', '{"text": null}'])
def test_jsonl_row_without_text_names_the_row(tmp_path, second):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "fine"}\n' + second + "\n")
    with pytest.raises(CalibrationError, match=r"calib\.jsonl: row 2 has no 'text' value"):
        load_texts(path)


@pytest.mark.parametrize("name, content", [
    ("calib.txt", b"caf\xe9 au lait\n"),
    ("calib.csv", b"label,text\n0,caf\xe9\n"),
    ("calib.jsonl", b'{"text": "caf\xe9"}\n'),
])
def test_undecodable_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CalibrationError, match="save it as UTF-8") as info:
        load_texts(path)
    assert name in str(info.value) and info.value.__cause__ is None


@pytest.mark.parametrize("name, content", [
    ("calib.txt", ""), ("calib.txt", "  \n\n"), ("calib.csv", ""), ("calib.jsonl", "\n"), ("calib.json", "[]"),
    ("calib.csv", "label,text\n0,\n"),
])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CalibrationError, match="empty"):
        load_texts(path)


def test_empty_list():
    with pytest.raises(CalibrationError, match="empty"):
        load_texts(["", "  "])


def test_nonexistent_source_offline(tmp_path):
    with pytest.raises(CalibrationError) as info:
        load_texts("no-such-calibration-dataset-xyz")
    message = str(info.value)
    assert "no such file or folder" in message and "network" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts(str(tmp_path / "missing.csv"))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts(tmp_path / "missing")


def test_unsupported_source():
    with pytest.raises(CalibrationError, match="type int"):
        load_texts(3)


def _model_dir(folder: Path, words: list[str]) -> Path:
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(sorted(set(words))[:126])}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    tiny_model("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_calibrates_on_the_text_column_of_a_csv(tmp_path, capsys):
    from hf_subprune.cli import main

    lines = [line for line in builtin_text()[:6000].splitlines() if line.strip()][:40]
    texts = [f"{line}, and more" for line in lines]
    model = _model_dir(tmp_path / "model", " ".join(texts).replace(",", " ").split())
    csv_path = tmp_path / "calib.csv"
    csv_path.write_text("label,text\n" + "".join(f'{i % 2},"{t.replace(chr(34), chr(34) * 2)}"\n'
                                                for i, t in enumerate(texts)))
    out = tmp_path / "pruned"
    common = ["prune", str(model), "--sparsity", "0.3", "--calibration", str(csv_path), "--num-samples", "2",
              "--seq-len", "16", "--quiet", "--no-check"]
    assert main([*common, "--output", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "subprune_report.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(model)
    assert load_texts(csv_path) == texts
    expected = token_blocks(texts, tok, 2, 16, seed=report["config"]["seed"])
    assert report["calibration"]["fingerprint"] == fingerprint(expected)

    assert main([*common, "--output", str(tmp_path / "other"), "--text-column", "label"]) == 2
    assert "column 'label'" in capsys.readouterr().err
