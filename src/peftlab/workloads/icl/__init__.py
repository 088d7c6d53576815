"""In-context learning (W6): the `icl` settings section and the spec registering `peftlab icl`. An icl run is an
evaluation, not a training: k demonstrations drawn from the training split are put before every test example, the
model (a base model, a local Hugging Face directory or a trained run with its adapter on) predicts by verbaliser
log-likelihood (raw, length-normalised, contextually calibrated) or by greedy generation. The prompt formats and
the demonstrations file are light (`templates`, `command_line`); the scoring (`scoring`), the evaluation loop
(`evaluation`) and the run directory's files (`outputs`) are imported when the command runs (`command`).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.settings import setting
from peftlab.workloads.registry import Command, WorkloadSpec

PREDICT_MODES = ("score", "generate", "both")
REASONING = ("rationale", "answer", "zero-shot")
DEFAULT_SHOTS = (0, 1, 2, 4, 8, 16)


@dataclass
class IclConfig:
    """k-shot prompting of a model on a task (`peftlab icl`); config.yaml's `icl` section of an icl run."""

    shots: list[int] | None = setting(None, "comma-separated numbers of demonstrations k, each evaluated",
                                      default_text=",".join(map(str, DEFAULT_SHOTS)) + " (cot: those up to "
                                      "--demonstration-pool)")
    demo_seeds: int = setting(5, "demonstration sets per k, drawn with seeds 0..N-1 (mean ± std over them)")
    balanced: bool = setting(False, "draw the demonstrations with the labels in turn (classification tasks)")
    split: str = setting("validation", "the split evaluated (choose formats on validation, not test)")
    limit: int = setting(0, "evaluate N evenly spaced examples of the split; 0 = all")
    format: str | None = setting(None, "prompt format: a name (see --help of `peftlab icl`), or a format string "
                                 "with {sentence} or {input} (squad: {context} and {question}; cot: {input}); "
                                 "\\n = newline", default_text="the task's first, lm-eval (cot: qa)")
    verbalizers: list[str] | None = setting(None, "comma-separated answer text per label, in label order",
                                            default_text="the format's")
    chat: bool = setting(False, "wrap every demonstration and the test example in the tokenizer's chat template "
                         "(user turn: the formatted input; assistant turn: the answer)")
    predict: str = setting("score", "classification: score (verbaliser log-likelihood) | generate (greedy, parsed; "
                           "unparsable is wrong) | both; squad always generates")
    max_new_tokens: int = setting(32, "greedy generation: new tokens per example at most")
    batch_size: int = setting(32, "test examples per forward pass")
    demonstrations: str = setting("", "task cot: a JSONL file of problems, one object a line with input, rationale and "
                                  "answer; its first --demonstration-pool lines are drawn from, the rest evaluated")
    demonstration_pool: int = setting(8, "task cot: the number of the file's first problems demonstrations are "
                                      "drawn from")
    reasoning: str = setting("rationale", "task cot: rationale (demonstrations 'Q: ... A: <rationale> The answer is "
                             "X.') | answer (the same without rationales) | zero-shot (no demonstrations; every "
                             "answer begins \"Let's think step by step.\")")
    run: str = setting("", "the trained run evaluated with its adapter on (set from --model RUN_DIR); empty = the "
                       "base model model.name")


SPEC = WorkloadSpec(
    name="icl",
    workload="peftlab.workloads.icl.command:IclWorkload",
    settings=IclConfig,
    train_options=False,
    commands=(
        Command("icl", "k-shot in-context learning of a model or run on cola, rotten_tomatoes or squad (W6)",
                arguments="peftlab.workloads.icl.command_line:icl_arguments",
                run="peftlab.workloads.icl.command:run_icl",
                description="Put k demonstrations from the training split (one set per seed, shared by every test "
                "example) before each test example and predict: by verbaliser log-likelihood, raw (acc), divided by "
                "the verbaliser's length in characters (acc_norm, as lm-evaluation-harness) and contextually "
                "calibrated (Zhao et al. 2021: divided by the mean label probabilities of the content-free inputs "
                "'N/A', '[MASK]' and '' after the same demonstrations); or by greedy generation. The demonstrations "
                "are computed once per set and every test example continues from their key/value cache. Writes "
                "config.yaml, predictions.jsonl, results.json, results.md and plots/icl.png into --output-dir.",
                writes_runs=True),
    ),
)
