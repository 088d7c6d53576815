"""bench/gpu_check.py cannot rot unseen: its --smoke mode (CPU, tiny random Llama, synthetic data) runs every part
of the GPU check and writes the JSON the real run writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_data import write_cola

ROOT = Path(__file__).resolve().parents[1]


def write_squad(directory: Path) -> None:
    """Two contexts with three questions each, for both splits (SQuAD v1.1 layout)."""
    paragraphs = []
    for index, (name, colour) in enumerate([("Anna", "red"), ("Ben", "blue")]):
        context = f"{name} painted the door {colour}. The house was old. It stood by the river."
        qas = [{"id": f"q{index}-{k}", "question": question, "answers": [{"text": answer, "answer_start": context.index(answer)}]}
               for k, (question, answer) in enumerate([(f"What colour did {name} paint the door?", colour),
                                                       ("Where did the house stand?", "by the river"),
                                                       ("What was old?", "The house")])]
        paragraphs.append({"context": context, "qas": qas})
    document = json.dumps({"data": [{"title": "Test", "paragraphs": paragraphs}], "version": "1.1"})
    (directory / "squad").mkdir()
    for name in ("dev-split-train.json", "dev-split-validation.json"):
        (directory / "squad" / name).write_text(document)


def test_the_smoke_mode_runs_every_part_and_writes_the_results(tmp_path):
    write_cola(tmp_path)
    write_squad(tmp_path)
    output = tmp_path / "gpu_check.json"
    environment = os.environ | {"PEFTLAB_DATA": str(tmp_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    finished = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--output", str(output)],
                              check=False, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["smoke"] and results["peak_bf16_tflops"] is None  # a CPU has no entry in the peak table
    for task in ("cola", "squad_shared_contexts"):
        training = results["training"][task]
        assert training["steps"] == 3 and training["tokens"] > 0 and training["tokens_per_s"] > 0
        assert training["mfu"] is None
    for batch, decoding in results["decoding"].items():
        assert decoding["rows"] == min(int(batch), 6) and decoding["rows_identical"] == 1.0  # greedy: same tokens
    parity = results["lora_parity_fp32_bf16"]
    assert len(parity["losses"]["fp32"]) == len(parity["losses"]["bf16"]) == 2 and parity["within_tolerance"]
