"""Preference pairs (`peftlab.data.preferences`): the JSONL reader, its file:line errors, a file or a folder as the
source, and the validation split held out by prompt when only a training file is given."""

import json
import random

import pytest

from peftlab import PeftlabError
from peftlab.data.datasets import get_dataset, objective_of
from peftlab.data.preferences import parse_pair, preference_files, present_splits, read_preferences


def write_pairs(path, records) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def pairs_over(prompts: int, per_prompt: int = 2) -> list[dict]:
    return [{"prompt": f"Prompt {p}:", "chosen": f" good {k}", "rejected": f" bad {k}"}
            for p in range(prompts) for k in range(per_prompt)]


def test_a_file_is_read_with_origins_and_scores(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "Q:", "chosen": " yes", "rejected": " no", "chosen_score": 0.9, "rejected_score": 1}\n'
                    '\n'
                    '{"prompt": "R:", "chosen": " é", "rejected": " e"}\n', encoding="utf-8")
    pairs = read_preferences("train", path) + read_preferences("validation", path)
    by_prompt = {pair.prompt: pair for pair in pairs}
    assert sorted(by_prompt) == ["Q:", "R:"] and len(pairs) == 2  # one prompt each side
    assert (by_prompt["Q:"].chosen_score, by_prompt["Q:"].rejected_score) == (0.9, 1.0)
    assert by_prompt["R:"].chosen == " é" and by_prompt["R:"].chosen_score is None
    assert by_prompt["R:"].origin == f"{path}:3"  # the blank line counts
    assert not by_prompt["Q:"].chosen_truncated and not by_prompt["Q:"].rejected_truncated  # absent: false


def test_truncation_marks_are_read():
    path_text = '{"prompt": "Q:", "chosen": " yes", "rejected": " no but", "rejected_truncated": true, ' \
                '"chosen_truncated": false}'
    pair = parse_pair(path_text, "f:1")
    assert (pair.chosen_truncated, pair.rejected_truncated) == (False, True)


def test_held_out_validation_takes_whole_prompts_a_tenth_at_least_one(tmp_path):
    records = pairs_over(prompts=25, per_prompt=3)
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, records)
    train, validation = read_preferences("train", path), read_preferences("validation", path)
    assert len({pair.prompt for pair in validation}) == 2  # floor(25 / 10)
    assert not {pair.prompt for pair in train} & {pair.prompt for pair in validation}
    assert len(train) + len(validation) == len(records)
    # The rule depends on the prompts only, not on the line order.
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    write_pairs(tmp_path / "shuffled.jsonl", shuffled)
    assert {p.prompt for p in read_preferences("validation", tmp_path / "shuffled.jsonl")} == {p.prompt for p in validation}
    small = write_pairs(tmp_path / "small.jsonl", pairs_over(prompts=3))
    assert len({pair.prompt for pair in read_preferences("validation", small)}) == 1
    single = write_pairs(tmp_path / "single.jsonl", pairs_over(prompts=1))
    with pytest.raises(PeftlabError, match="one prompt, so no prompt can be held out"):
        read_preferences("train", single)


def test_a_folder_or_the_data_directory_gives_the_splits(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "preferences"
    write_pairs(folder / "train.jsonl", pairs_over(prompts=4))
    # Only a training file: validation is held out of it.
    assert preference_files(folder) == (folder / "train.jsonl", None)
    assert len(read_preferences("validation", tmp_path / "data")) == 2  # DIR/preferences/ found under the data dir
    write_pairs(folder / "validation.jsonl", [{"prompt": "V:", "chosen": " a", "rejected": " b"}])
    assert [pair.prompt for pair in read_preferences("validation", folder)] == ["V:"]
    assert len(read_preferences("train", folder)) == 8  # the whole training file
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp_path / "data"))
    assert present_splits(None) == ["train", "validation"]
    assert present_splits(tmp_path) == []  # no preferences here
    with pytest.raises(PeftlabError, match="expected .*train.jsonl"):
        read_preferences("train", tmp_path)
    assert get_dataset("preferences").objectives == ("dpo",) and objective_of("preferences", None) == "dpo"


@pytest.mark.parametrize("line, message", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{prompt: 1}", "not JSON"),
    (b'["Q", "a", "b"]', "expected a JSON object"),
    (b'{"prompt": "Q", "chosen": " a"}', '"rejected" must be a string, found missing'),
    (b'{"prompt": 3, "chosen": " a", "rejected": " b"}', '"prompt" must be a string, found a int'),
    (b'{"prompt": "Q", "chosen": "  ", "rejected": " b"}', '"chosen" is empty'),
    (b'{"prompt": "Q", "chosen": " a", "rejected": " a"}', "chosen and rejected are the same text"),
    (b'{"prompt": "Q", "chosen": " a", "rejected": " b", "chosen_score": "high"}', '"chosen_score" must be a number'),
    (b'{"prompt": "Q", "chosen": " a", "rejected": " b", "rejected_truncated": 1}',
     '"rejected_truncated" must be true or false, found 1'),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "P", "chosen": " x", "rejected": " y"}\n' + line + b"\n")
    with pytest.raises(PeftlabError, match=message) as error:
        read_preferences("train", path)
    assert f"{path}:2" in str(error.value)


def test_a_blank_file_is_an_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(PeftlabError, match="no preference pairs .*blank"):
        read_preferences("train", path)
