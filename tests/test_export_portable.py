"""Exports name their base model portably: a known model by its public hub id (SmolLM2: the Instruct model the GGUF
was made from, the de-quantisation noted), anything else as given or by `--base-model`; an export loads with peft
once the base model directory has moved and is given by path."""

import json
import shutil

import torch

from peftlab.catalog import export_base
from peftlab.cli import main
from peftlab.train import train
from test_train import tiny_config
from tiny_data import write_cola


def test_a_known_model_is_named_by_its_public_id():
    smollm2 = export_base("smollm2-135m")
    assert smollm2.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "de-quantised" in smollm2.note and "GGUF" in smollm2.note
    assert export_base("gpt2").name_or_path == "openai-community/gpt2"
    assert export_base("smollm2-135m", "/models/smol").name_or_path == "/models/smol"


def test_peft_export_loads_after_the_base_model_moved(tiny_model_dir, tmp_path):
    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftlab.workloads.loading import load_run

    model_dir = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    data = write_cola(tmp_path / "data", train_rows=32, dev_rows=8)
    run = tmp_path / "run"
    train(tiny_config(str(model_dir), data, run, epochs=1))
    _, _, ours = load_run(str(run))
    ours.eval()
    input_ids = torch.tensor([[464, 3797, 3332, 319, 262, 2603, 13]])
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        expected = ours(input_ids, mask)

    moved = tmp_path / "elsewhere" / "tiny-gpt2"  # where "another machine" keeps the base model
    assert main(["export", str(run), str(tmp_path / "plain")]) == 0
    assert main(["export", str(run), str(tmp_path / "portable"), "--base-model", str(moved)]) == 0
    shutil.move(str(model_dir), moved)  # the training machine's layout is gone

    plain = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert plain["base_model_name_or_path"] == str(model_dir)  # a local model: as the run named it
    config = json.loads((tmp_path / "portable" / "adapter_config.json").read_text())
    record = json.loads((tmp_path / "portable" / "peftlab_export.json").read_text())
    assert config["base_model_name_or_path"] == record["base_model"] == str(moved)
    assert "--base-model" in record["base_model_note"]
    assert str(moved) in (tmp_path / "portable" / "README.md").read_text()

    # The base given by path, by hand and through the export's own base_model_name_or_path.
    by_hand = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(moved, num_labels=2),
                                        tmp_path / "plain").eval()
    by_config = AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "portable").eval()
    with torch.no_grad():
        for model in (by_hand, by_config):
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
