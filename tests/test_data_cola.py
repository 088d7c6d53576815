import pytest

from peftlab import PeftlabError
from peftlab.data.cola import read_cola


def write(tmp_path, name, text):
    folder = tmp_path / "cola"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return tmp_path


def test_reads_the_original_format(tmp_path):
    data = write(tmp_path, "in_domain_train.tsv", "gj04\t1\t\tOur friends won't buy this.\ngj04\t0\t*\tThem buy.\n")
    examples = read_cola("train", data)
    assert [(e.text, e.label) for e in examples] == [("Our friends won't buy this.", 1), ("Them buy.", 0)]
    assert examples[1].origin.endswith("in_domain_train.tsv:2")


@pytest.mark.parametrize(
    "text, message",
    [
        ("gj04\t1\tOnly three columns\n", r"in_domain_dev.tsv:1: expected 4 tab-separated columns .* found 3"),
        ("gj04\t1\t\tfine\ngj04\t2\t\tbad label\n", r"in_domain_dev.tsv:2: label must be 0 or 1, found '2'"),
        ("gj04\t1\t\t   \n", r"in_domain_dev.tsv:1: empty sentence"),
        ("", r"in_domain_dev.tsv: no examples"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, text, message):
    data = write(tmp_path, "in_domain_dev.tsv", text)
    with pytest.raises(PeftlabError, match=message):
        read_cola("validation", data)


def test_missing_file_and_directory_are_clear(tmp_path, monkeypatch):
    with pytest.raises(PeftlabError, match=r"CoLA train split not found: expected the file .*in_domain_train.tsv"):
        read_cola("train", tmp_path)
    monkeypatch.delenv("PEFTLAB_DATA", raising=False)
    with pytest.raises(PeftlabError, match="--data-dir DIR or set PEFTLAB_DATA"):
        read_cola("train")
    with pytest.raises(PeftlabError, match="unknown CoLA split 'test'"):
        read_cola("test", tmp_path)


@pytest.mark.slow
def test_real_cola_counts():
    import os
    from pathlib import Path

    data = os.environ.get("PEFTLAB_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    if not Path(data, "cola").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real CoLA not found in {data}: CI must have ../shared/data beside the clone")
        pytest.skip(f"real CoLA not found in {data}")
    train, dev = read_cola("train", data), read_cola("validation", data)
    assert (len(train), sum(e.label for e in train)) == (8551, 6023)
    assert (len(dev), sum(e.label for e in dev)) == (527, 365)
