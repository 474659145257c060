import json

import pytest

from distillm_tune.data import format_prompt, load_eval_set


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_formats_prompts_and_reference_lists(tmp_path):
    path = write(tmp_path / "e.jsonl", [
        json.dumps({"instruction": "A", "input": "x", "references": ["r1", "r2"]}),
        json.dumps({"instruction": "B", "output": "o"}),
        json.dumps({"instruction": "C", "context": "ctx", "response": "resp", "category": "qa"}),
        json.dumps({"instruction": "D", "input": "", "output": "o2"}),
    ])
    es = load_eval_set(path)
    assert len(es) == 4
    assert es.prompts == [format_prompt("A", "x"), format_prompt("B"), format_prompt("C", "ctx"),
                          format_prompt("D")]
    assert es.references == [["r1", "r2"], ["o"], ["resp"], ["o2"]]


@pytest.mark.parametrize("bad,problem", [
    ({"input": "x", "output": "o"}, "missing field 'instruction'"),
    ({"instruction": "A"}, "missing field 'references'"),
    ({"instruction": "A", "references": []}, "non-empty list"),
    ({"instruction": "A", "references": "r"}, "non-empty list"),
    ({"instruction": "A", "references": ["ok", 3]}, "references[1]"),
    ({"instruction": "A", "output": ""}, "'output' is empty"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, problem):
    path = write(tmp_path / "e.jsonl", [json.dumps({"instruction": "A", "output": "o"}),
                                        json.dumps(bad)])
    with pytest.raises(ValueError) as e:
        load_eval_set(path)
    assert f"{path}:2" in str(e.value) and problem in str(e.value)
    es = load_eval_set(path, on_bad_row="skip")
    assert len(es) == 1 and es.stats.get("bad_row") == 1


def test_prompt_ids_truncate_keeping_bos_and_cue(tmp_path, char_tok):
    path = write(tmp_path / "e.jsonl", [json.dumps({"instruction": "A" * 300, "output": "o"}),
                                        json.dumps({"instruction": "short", "output": "o"})])
    es = load_eval_set(path)
    full = es.prompt_ids(char_tok)
    assert full[1] == char_tok.encode(format_prompt("short"))
    cut = es.prompt_ids(char_tok, max_prompt_len=200)
    assert len(cut[0]) == 200 and cut[0][0] == char_tok.bos_id and cut[0][1:] == full[0][-199:]
    assert len(full[1]) < 200 and cut[1] == full[1]
    assert char_tok.decode(cut[0]).endswith("### Response:\n")


def test_empty_set_is_an_error(tmp_path):
    path = write(tmp_path / "e.jsonl", [json.dumps({"instruction": "A"})])
    with pytest.raises(ValueError, match="no usable examples"):
        load_eval_set(path, on_bad_row="skip")
