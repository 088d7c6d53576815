"""DPO (`peftlab.workloads.dpo`): the loss, rewards and gradient by hand (eq. 7 of the DPO paper), conservative DPO's
smoothing, the reference (the base model with the adapter disabled; an --init-from run's adapter, frozen),
precomputed == live reference log-probs, packed == unpacked pairs, the refusals, and `peftlab train` end to end."""

import json
import math
from pathlib import Path

import pytest
import torch

from peftlab import PeftlabError
from peftlab.cache import stored_fingerprint
from peftlab.cli import main
from peftlab.data.preferences import PreferencePair
from peftlab.models import convert_conv1d_to_linear
from peftlab.peft import apply_method
from peftlab.peft.base import adapter_parameters, disable_adapters
from peftlab.peft.checkpoint import save_adapter
from peftlab.tasks.completion import sequence_logprobs
from peftlab.train import init_from_run, train
from peftlab.workloads.dpo.reference import DISABLED, check_reference_possible, load_reference_state, reference_model
from peftlab.workloads.dpo.task import DPOTask, Precompute, dpo_losses
from peftlab.workloads.loading import build_model, build_task, load_run
from test_train import tiny_config
from tiny_data import write_cola

PAIRS = [PreferencePair("The film was", " a joy to watch", " dull", "t:1"),
         PreferencePair("Plot summary:", " clever", " a mess of ideas", "t:2"),
         PreferencePair("The film was", " fine", " bad, very bad", "t:3")]  # shares its prompt with t:1
LORA = {"method": "lora", "targets": ["all-linear"], "rank": 4, "alpha": 8}
METHODS = [LORA, {"method": "dora", "targets": ["all-linear"], "rank": 4, "alpha": 8}, {"method": "ia3"},
           {"method": "adapter", "adapter_size": 8}, {"method": "prefix", "prefix_length": 3}]  # DPO's methods


def adapted(make_model, settings=LORA, seed=4, b_seed=1):
    """A tiny model with an adapter whose zero-initialised tensors are randomised, so it changes every output."""
    model = make_model(seed=seed)
    convert_conv1d_to_linear(model)
    apply_method(model, settings)
    generator = torch.Generator().manual_seed(b_seed)
    with torch.no_grad():
        for parameter in adapter_parameters(model):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.train()


def base_of(make_model, seed=4):
    model = make_model(seed=seed)
    convert_conv1d_to_linear(model)
    return model


def dpo_task(tokenizer, pairs=PAIRS, beta=0.5, label_smoothing=0.0) -> DPOTask:
    return DPOTask(lambda split: list(pairs), tokenizer, 64, beta, label_smoothing)


def alone(model, sequence) -> torch.Tensor:
    """log p(completion + EOS | prompt) of one sequence on its own: no padding, no mask, with gradient."""
    ids = torch.tensor([sequence.input_ids])
    log_probs = model(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
    start = sequence.target.prompt_length
    return log_probs[start - 1:].gather(-1, ids[0, start:, None]).sum()


def test_loss_rewards_and_gradient_match_the_papers_formulas(make_tiny_gpt2, gpt2_tokenizer):
    model, beta = adapted(make_tiny_gpt2), 0.5
    task = dpo_task(gpt2_tokenizer, beta=beta)
    pairs = task.encode("train")
    output = task.forward(model, task.collate(pairs))
    assert all(module.training for module in model.modules())  # the reference pass put the flags back
    parameters = adapter_parameters(model)
    ours = torch.autograd.grad(output.loss_sum, parameters)

    expected_grad = [torch.zeros_like(parameter) for parameter in parameters]
    expected = {"loss": 0.0, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracies": 0.0,
                "rewards/margins": 0.0, "logps/chosen": 0.0, "logps/rejected": 0.0}
    for pair in pairs:
        winner, loser = alone(model, pair.target.chosen), alone(model, pair.target.rejected)
        with torch.no_grad(), disable_adapters(model):
            winner_ref, loser_ref = alone(model, pair.target.chosen), alone(model, pair.target.rejected)
        reward_w, reward_l = beta * (winner - winner_ref).item(), beta * (loser - loser_ref).item()
        expected["loss"] += -math.log(1 / (1 + math.exp(-(reward_w - reward_l))))
        expected["rewards/chosen"] += reward_w
        expected["rewards/rejected"] += reward_l
        expected["rewards/accuracies"] += float(reward_w > reward_l)
        expected["rewards/margins"] += reward_w - reward_l
        expected["logps/chosen"] += winner.item()
        expected["logps/rejected"] += loser.item()
        # Eq. 7: grad L = -beta * sigma(r_l - r_w) * (grad log pi(y_w) - grad log pi(y_l)), summed over the pairs.
        weight = beta / (1 + math.exp(-(reward_l - reward_w)))
        for total, grad_w, grad_l in zip(expected_grad, torch.autograd.grad(winner, parameters),
                                         torch.autograd.grad(loser, parameters)):
            total += weight * (grad_l - grad_w)

    assert output.num_targets == len(pairs) == 3
    assert output.loss_sum.item() == pytest.approx(expected["loss"], rel=1e-5)
    for name, (value, count) in output.sums.items():
        assert count == 3 and float(value) == pytest.approx(expected[name], rel=1e-4, abs=1e-5), name
    assert output.num_correct == expected["rewards/accuracies"]
    assert 0 < expected["rewards/accuracies"] < 3  # the random adapter prefers some chosen, not all
    for got, want in zip(ours, expected_grad):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert max(float(grad.abs().max()) for grad in ours) > 1e-3


def test_pairs_that_cannot_be_encoded_name_their_line(gpt2_tokenizer):
    with pytest.raises(PeftlabError, match="t:9: the prompt is empty"):
        dpo_task(gpt2_tokenizer, [PreferencePair("", " a", " b", "t:9")]).encode("train")
    with pytest.raises(PeftlabError, match=r"t:8: 7\d tokens with the prompt, more than --max-length 64"):
        dpo_task(gpt2_tokenizer, [PreferencePair("Q:", " a", " word" * 70, "t:8")]).encode("train")


def test_a_truncated_completion_is_trained_without_eos(gpt2_tokenizer):
    eos = gpt2_tokenizer.eos_token_id
    cut = PreferencePair("The film was", " a joy to", " dull.", "t:1", rejected_truncated=False, chosen_truncated=True)
    [pair] = dpo_task(gpt2_tokenizer, [cut]).encode("train")
    chosen, rejected = pair.target.chosen.input_ids, pair.target.rejected.input_ids
    assert chosen == gpt2_tokenizer("The film was")["input_ids"] + gpt2_tokenizer(" a joy to")["input_ids"]
    assert rejected[-1] == eos and chosen[-1] != eos
    assert pair.input_ids == chosen + rejected[len(gpt2_tokenizer("The film was")["input_ids"]):]  # the packed row


def test_a_minimum_score_gap_keeps_the_clear_training_pairs_only(gpt2_tokenizer):
    scored = [PreferencePair("The film was", " a joy", " dull", "t:1", 0.9, 0.1),  # gap 0.8
              PreferencePair("Plot:", " clever", " a mess", "t:2", 0.6, 0.5),  # gap 0.1
              PreferencePair("The film was", " fine", " bad", "t:3", 0.75, 0.3)]  # gap 0.45
    task = DPOTask(lambda split: list(scored), gpt2_tokenizer, 64, 0.5, 0.0, min_score_gap=0.4)
    assert [pair.origin for pair in task.encode("train")] == ["t:1", "t:3"]
    assert len(task.encode("validation")) == 3  # validation keeps every pair, so runs stay comparable
    with pytest.raises(PeftlabError, match=r"keeps none of the 3 training pairs \(the largest gap is 0.8\)"):
        DPOTask(lambda split: list(scored), gpt2_tokenizer, 64, 0.5, 0.0, min_score_gap=0.9).encode("train")
    with pytest.raises(PeftlabError, match="t:1: --min-score-gap 0.2 needs chosen_score and rejected_score"):
        DPOTask(lambda split: list(PAIRS), gpt2_tokenizer, 64, 0.5, 0.0, min_score_gap=0.2).encode("train")
    with pytest.raises(PeftlabError, match="--min-score-gap must be >= 0"):
        DPOTask(lambda split: list(PAIRS), gpt2_tokenizer, 64, 0.5, 0.0, min_score_gap=-1)


def test_conservative_dpo_smoothing_by_hand():
    policy, reference = torch.tensor([[-3.0, -5.0]]), torch.tensor([[-4.0, -4.0]])  # delta = 1 - (-1) = 2
    losses, rewards = dpo_losses(policy, reference, beta=0.5, label_smoothing=0.2)  # beta * delta = 1
    softplus = lambda x: math.log1p(math.exp(x))  # -log sigma(x) = softplus(-x)
    assert losses.item() == pytest.approx(0.8 * softplus(-1) + 0.2 * softplus(1), rel=1e-6)
    assert rewards.tolist() == [[0.5, -0.5]]
    plain, _ = dpo_losses(policy, reference, beta=0.5, label_smoothing=0.0)
    assert plain.item() == pytest.approx(softplus(-1), rel=1e-6)


@pytest.mark.parametrize("settings", METHODS, ids=lambda settings: settings["method"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_disabled_reference_is_the_base_model(family, settings, make_tiny_gpt2, make_tiny_llama):
    make = make_tiny_gpt2 if family == "gpt2" else make_tiny_llama
    model, base = adapted(make, settings), base_of(make)
    check_reference_possible(model, settings["method"], [])
    ids = torch.tensor([[5, 17, 300, 4, 9, 12]])
    before = [parameter.detach().clone() for parameter in model.parameters()]
    with reference_model(model, DISABLED):
        assert not torch.is_grad_enabled() and not model.training
        reference = model(input_ids=ids).logits
    torch.testing.assert_close(reference, base(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(model(input_ids=ids).logits, reference, atol=1e-3)  # the policy differs
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and model.training


def test_a_frozen_reference_is_swapped_in_by_pointer_and_back(make_tiny_gpt2, tmp_path):
    sft = adapted(make_tiny_gpt2, b_seed=7)
    save_adapter(sft, tmp_path / "sft", "tiny")
    model = adapted(make_tiny_gpt2, b_seed=1)
    reference = load_reference_state(model, tmp_path / "sft")
    storage = [parameter.data_ptr() for parameter in adapter_parameters(model)]
    ids = torch.tensor([[5, 17, 300, 4, 9, 12]])
    with reference_model(model, reference):
        assert [parameter.data_ptr() for parameter, _ in reference.frozen] == [t.data_ptr() for _, t in reference.frozen]
        torch.testing.assert_close(model(input_ids=ids).logits, sft(input_ids=ids).logits, rtol=0, atol=1e-6)
    assert [parameter.data_ptr() for parameter in adapter_parameters(model)] == storage


@pytest.mark.parametrize("settings", METHODS, ids=lambda settings: settings["method"])
def test_packed_pairs_equal_unpacked_sequences(settings, make_tiny_gpt2, make_tiny_llama, gpt2_tokenizer):
    for make in (make_tiny_gpt2, make_tiny_llama):
        model = adapted(make, settings)
        task = dpo_task(gpt2_tokenizer)
        pairs = task.encode("train")
        packed = task.collate(pairs)
        task.shares_prefixes = False
        padded = task.collate(pairs)
        assert len(packed["input_ids"]) == 2 < len(padded["input_ids"]) == 6  # t:1 and t:3 share one row
        alone_values = torch.stack([alone(model, sequence) for pair in pairs
                                    for sequence in (pair.target.chosen, pair.target.rejected)])
        torch.testing.assert_close(sequence_logprobs(model, packed), alone_values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sequence_logprobs(model, padded), alone_values, rtol=1e-5, atol=1e-5)
        # A hook on the model: it runs whole (the LM head on every target column), with the same values.
        model.register_forward_pre_hook(lambda module, args: None)
        torch.testing.assert_close(sequence_logprobs(model, packed), alone_values, rtol=1e-5, atol=1e-5)


def test_precomputed_reference_equals_live_and_follows_model_and_data(make_tiny_gpt2, gpt2_tokenizer, tmp_path,
                                                                      monkeypatch):
    model = adapted(make_tiny_gpt2)
    live_task, cached_task = dpo_task(gpt2_tokenizer), dpo_task(gpt2_tokenizer)
    cached_task.precompute = Precompute(model, tmp_path / "cache", "tiny")
    path = tmp_path / "cache" / "reference-train.safetensors"

    def check_equal():
        pairs = cached_task.encode("train")
        batch = cached_task.collate(pairs)
        assert "reference_logps" in batch
        live, cached = live_task.forward(model, live_task.collate(live_task.encode("train"))), cached_task.forward(model, batch)
        assert cached.loss_sum.item() == pytest.approx(live.loss_sum.item(), rel=1e-6)
        for name in live.sums:
            assert float(cached.sums[name][0]) == pytest.approx(float(live.sums[name][0]), rel=1e-5, abs=1e-6)
        return stored_fingerprint(path)

    first = check_equal()
    monkeypatch.setattr(cached_task, "reference_logps", lambda *args: pytest.fail("recomputed an unchanged cache"))
    cached_task.encode("train")  # a cache hit
    with torch.no_grad():
        for parameter in adapter_parameters(model):
            parameter.mul_(2)  # the policy trains; the disabled reference does not see it
    cached_task.encode("train")  # still a hit
    monkeypatch.undo()
    with torch.no_grad():
        model.transformer.ln_f.weight.add_(0.5)  # another base model
    changed_model = check_equal()
    assert changed_model["reference_weights"] != first["reference_weights"]
    save_adapter(adapted(make_tiny_gpt2, b_seed=9), tmp_path / "sft", "tiny")
    reference = load_reference_state(model, tmp_path / "sft")  # another reference adapter
    live_task.reference_state = cached_task.reference_state = reference
    changed_adapter = check_equal()
    assert changed_adapter["reference_weights"] != changed_model["reference_weights"]
    live_task.read_split = cached_task.read_split = lambda split: PAIRS[:2]  # other data
    assert check_equal()["pairs"] != changed_adapter["pairs"]


def write_preferences(path: Path, prompts: int = 3) -> str:
    records = [{"prompt": f"Review number {index}:", "chosen": " great fun", "rejected": " dull and far too long"}
               for index in range(prompts)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def dpo_config(model_dir, preferences, output_dir, **train_settings):
    config = tiny_config(model_dir, None, output_dir, **({"epochs": 1, "batch_size": 2, "warmup_ratio": 0.0}
                                                         | train_settings))
    config.task.name, config.adapter.dropout = "preferences", 0.0
    build_task(config)  # adds the dpo section
    config.dpo.preferences = preferences
    return config


@pytest.fixture(scope="module")
def sft(tiny_model_dir, tmp_path_factory):
    """A 2-step instruct (SFT) run with the same LoRA settings as the DPO runs below."""
    root = tmp_path_factory.mktemp("sft")
    config = tiny_config(tiny_model_dir, write_cola(root / "data", train_rows=8, dev_rows=4), root / "sft", epochs=1,
                         batch_size=4, lr=5e-2, max_steps=2)
    config.task.objective, config.adapter.dropout = "instruct", 0.0
    train(config)
    return config


def test_the_init_from_run_is_the_reference_and_the_start(tiny_model_dir, sft, tmp_path):
    _, sft_task, sft_model = load_run(sft.output_dir)

    config = dpo_config(tiny_model_dir, write_preferences(tmp_path / "pairs.jsonl"), tmp_path / "dpo")
    config.train.init_from = sft.output_dir
    task = build_task(config)
    model = build_model(config, task, torch.device("cpu"), fresh=True)
    pairs = task.encode("train")
    batch = task.collate(pairs)
    expected = sequence_logprobs(sft_model, batch)
    with reference_model(model, task.reference_state):
        torch.testing.assert_close(sequence_logprobs(model, batch), expected, rtol=0, atol=1e-5)
    init_from_run(model, config)  # the policy starts where the SFT run ended, too
    torch.testing.assert_close(sequence_logprobs(model, batch), expected, rtol=0, atol=1e-5)
    with torch.no_grad(), disable_adapters(sft_model):  # the SFT run did move the model: a real test
        assert (sequence_logprobs(sft_model, batch) - expected).abs().max() > 1e-3

    summary = train(dpo_config(tiny_model_dir, config.dpo.preferences, tmp_path / "dpo-run", batch_size=1,
                               init_from=sft.output_dir))
    first = json.loads((tmp_path / "dpo-run" / "steps.jsonl").read_text().splitlines()[0])
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5) and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["steps_completed"] == 2


@pytest.mark.parametrize("options, reason", [
    (["--method", "full"], "cannot train with --method full"),
    (["--method", "bitfit"], "cannot train with --method bitfit"),
    (["--extra-trainable", "norms"], "cannot train --extra-trainable norms"),
])
def test_methods_that_move_the_reference_are_refused(tiny_model_dir, tmp_path, capsys, options, reason):
    code = main(["train", "--task", "preferences", "--preferences", write_preferences(tmp_path / "p.jsonl"),
                 "--model", tiny_model_dir, "--device", "cpu", "--output-dir", str(tmp_path / "run"), *options])
    assert code == 2
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "run" / "steps.jsonl").exists()


def test_train_dpo_end_to_end(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    code = main(["train", "--objective", "dpo", "--preferences", write_preferences(tmp_path / "p.jsonl"),
                 "--model", tiny_model_dir, "--device", "cpu", "--output-dir", str(run), "--targets", "all-linear",
                 "--rank", "4", "--alpha", "8", "--lora-dropout", "0", "--batch-size", "1", "--epochs", "5",
                 "--lr", "2e-2", "--warmup-ratio", "0", "--beta", "0.5", "--precompute-reference"])
    assert code == 0
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 10  # 2 training pairs (1 prompt held out), 5 epochs
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    assert all(name in row for row in steps for name in names)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"] and steps[-1]["rewards/margins"] > 0
    assert (run / "cache" / "reference-train.safetensors").is_file()
    assert (run / "plots" / "metrics.png").is_file()
    best = json.loads((run / "summary.json").read_text())["best"]
    assert best["val_rewards/accuracies"] == 1.0
    assert "name: preferences" in (run / "config.yaml").read_text()  # --objective dpo alone chose the task
    # The HTML report draws the run's own metrics (summary.json names them) beside its loss.
    assert json.loads((run / "summary.json").read_text())["metric_names"] == ["rewards/accuracies", "rewards/margins"]
    assert main(["report", str(run), "--html", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    assert "alt='loss.png'" in page and "alt='metrics.png'" in page


def test_a_resumed_run_keeps_its_reference_and_cache(tiny_model_dir, sft, tmp_path):
    """Resuming reads the reference from the --init-from run's file, not from the policy it resumes (which has
    moved), and finds its precomputed log-probs: the resumed run follows the uninterrupted one."""
    preferences = write_preferences(tmp_path / "pairs.jsonl")
    runs = {}
    for name in ("whole", "resumed"):
        config = dpo_config(tiny_model_dir, preferences, tmp_path / name, batch_size=1, epochs=2, lr=2e-2,
                            init_from=sft.output_dir)
        config.dpo.precompute_reference = True
        if name == "resumed":
            train(config, stop_after_epoch=1)
            cached = (tmp_path / name / "cache" / "reference-train.safetensors").stat().st_ino
        train(config, resume=name == "resumed")
        runs[name] = [json.loads(line) for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]
    assert len(runs["whole"]) == len(runs["resumed"]) == 4
    assert (tmp_path / "resumed" / "cache" / "reference-train.safetensors").stat().st_ino == cached  # not rewritten
    for whole, resumed in zip(runs["whole"], runs["resumed"]):
        assert resumed["loss"] == pytest.approx(whole["loss"], rel=1e-6)
        assert resumed["rewards/margins"] == pytest.approx(whole["rewards/margins"], rel=1e-5, abs=1e-7)


def test_a_missing_preferences_file_is_named_before_the_model_loads(tmp_path, capsys):
    code = main(["train", "--objective", "dpo", "--preferences", str(tmp_path / "missing.jsonl"), "--dry-run",
                 "--output-dir", str(tmp_path / "run")])
    assert code == 2
    captured = capsys.readouterr()
    assert f"--preferences {tmp_path / 'missing.jsonl'}: no such file or folder" in captured.err
    assert "Reduction" not in captured.out  # refused before any model was built
