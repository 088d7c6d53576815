"""Transfer sets for distillation: sampling new sentences and reading the file (the teacher labelling them:
test_distill.py)."""

from collections import Counter

import pytest
import torch

from peftlab import PeftlabError
from peftlab.generation import token_picker
from peftlab.sampling import Sampling
from peftlab.workloads.distill.task import read_transfer_file
from peftlab.workloads.distill.transfer import complete_sentence, sample_sentences
from peftlab.workloads.distill.transfer_settings import TRANSFER_SAMPLING, TransferSettings

TRAINING = ["The cat sat.", "A dog ran home.", "Birds sing loudly."]


def test_a_sample_is_kept_only_up_to_its_line_end_and_when_it_ends_a_sentence():
    assert complete_sentence("The cat", " ate the fish.\nThe dog") == ("The cat ate the fish.", "kept")
    assert complete_sentence("Did you", " see it?") == ("Did you see it?", "kept")
    assert complete_sentence("The cat", " ate the\nfish.") == (None, "no sentence end on the line")
    assert complete_sentence("The cat", " ate and ate") == (None, "no sentence end on the line")
    assert complete_sentence("A", " b" * 45 + ".")[0] is None


def test_sampling_rejects_duplicates_and_training_sentences_and_counts_every_sample():
    continuations = iter([" A new one.", " A new one.", " The cat sat.", " never ends", " Second one.", " Third one."])
    settings = TransferSettings(size=3, shots=1, prefix_words=0, batch_size=2)
    kept, outcomes = sample_sentences(lambda prompts, seed: [next(continuations) for _ in prompts], TRAINING, settings)
    assert kept == ["A new one.", "Second one.", "Third one."]
    assert outcomes == Counter({"kept": 3, "duplicate or training sentence": 2, "no sentence end on the line": 1})


def test_prompts_show_training_sentences_then_start_one_and_are_seeded():
    prompts_seen, seeds_seen = [], []

    def continue_prompts(prompts, seed):
        prompts_seen.extend(prompts)
        seeds_seen.append(seed)
        return [" went on." for _ in prompts]

    settings = TransferSettings(size=4, shots=2, prefix_words=1, batch_size=4, sampling=Sampling(seed=5))
    kept, _ = sample_sentences(continue_prompts, TRAINING, settings)
    for prompt in prompts_seen:
        *shots, prefix = prompt.split("\n")
        assert len(shots) == 2 and set(shots) <= set(TRAINING) and prefix in {"The", "A", "Birds"}
    assert len(prompts_seen) == 16 and set(kept) <= {"The went on.", "A went on.", "Birds went on."}  # 3 distinct at most
    first = (list(prompts_seen), list(seeds_seen))
    prompts_seen.clear(), seeds_seen.clear()
    sample_sentences(continue_prompts, TRAINING, settings)
    assert (prompts_seen, seeds_seen) == first  # same seed, same prompts and sampling seeds


def test_a_model_that_never_ends_a_sentence_stops_after_four_times_the_size():
    settings = TransferSettings(size=5, shots=0, batch_size=3)
    kept, outcomes = sample_sentences(lambda prompts, seed: [" and so on" for _ in prompts], TRAINING, settings)
    assert kept == [] and outcomes == Counter({"no sentence end on the line": 21})  # 7 batches of 3 >= 4 * 5
    with pytest.raises(PeftlabError, match="--temperature must be > 0"):
        sample_sentences(lambda prompts, seed: [], TRAINING, TransferSettings(sampling=Sampling(temperature=0)))


def test_transfer_file_lines_keep_their_origin_and_bad_files_are_clear_errors(tmp_path):
    path = tmp_path / "transfer.txt"
    path.write_text("The cat sat.\n\n  A dog ran.  \n", encoding="utf-8")
    assert read_transfer_file(path) == [("The cat sat.", f"{path}:1"), ("A dog ran.", f"{path}:3")]
    with pytest.raises(PeftlabError, match="not found.*peftlab transfer-set"):
        read_transfer_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(PeftlabError, match="no sentences"):
        read_transfer_file(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9.\n".encode("latin-1"))
    with pytest.raises(PeftlabError, match="not UTF-8"):
        read_transfer_file(tmp_path / "latin1.txt")


def test_top_p_sampling_keeps_the_smallest_set_reaching_p_and_is_seeded():
    logits = torch.tensor([0.5, 0.3, 0.2]).log().repeat(4000, 1)
    assert set(token_picker(Sampling(1.0, 0, 0.5, 0))(logits).tolist()) == {0}  # 0.5 alone reaches p = 0.5
    draws = token_picker(Sampling(1.0, 0, 0.7, 0))(logits)
    assert set(draws.tolist()) == {0, 1} and abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    hot = token_picker(Sampling(100.0, 0, 1.0, 0))(logits)  # a high temperature flattens the distribution
    assert abs((hot == 2).float().mean().item() - 1 / 3) < 0.03
    assert set(token_picker(Sampling(100.0, 2, 1.0, 0))(logits).tolist()) == {0, 1}
    assert torch.equal(token_picker(Sampling(1.0, 0, 0.9, 3))(logits), token_picker(Sampling(1.0, 0, 0.9, 3))(logits))


def test_transfer_sets_sample_with_their_own_overrides_of_the_one_sampling_class():
    sampling = TransferSettings().sampling  # the values the README's transfer sets were written with
    assert (sampling.temperature, sampling.max_new_tokens, sampling.seed, sampling.top_k, sampling.top_p) == (
        0.9, 32, 0, 200, 0.95)
    assert set(TRANSFER_SAMPLING) == {"temperature", "max_new_tokens", "seed"}  # top-k, top-p: generate's defaults
    assert TransferSettings().sampling is not sampling  # each settings object owns its sampling
