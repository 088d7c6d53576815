"""The `peftlab` command: a table of subcommands (the built-in ones, then each registered workload's), each with
its arguments and the "module:function" that runs it, imported only when it runs. No logic of its own, and no
import of torch or transformers: `peftlab --help`, `--version` and every `COMMAND --help` start at once.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from importlib import metadata

from peftlab import __version__
from peftlab.catalog import DEFAULT_MODEL, INITS, WEIGHTS
from peftlab.config import closest
from peftlab.errors import Interrupted, PeftlabError, os_error_line
from peftlab.options import RUN_PLACE_OPTIONS, add_options, eval_options, sampling_options, train_options
from peftlab.workloads.registry import Command, registered_workloads


def version_text() -> str:
    """peftlab's version and those of the libraries a run's numbers depend on (read without importing them)."""
    libraries = ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "transformers", "accelerate"))
    return f"peftlab {__version__} ({libraries})"


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"known model name (see `peftlab models`), local Hugging Face directory, or "
        f"(generate) a run directory of an instruct/qa run (default: {DEFAULT_MODEL})")
    parser.add_argument("--init", choices=INITS, default="pretrained",
                        help="pretrained weights, or the architecture with random weights (default: pretrained)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto = cuda if available)")


def _weights_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", choices=WEIGHTS, default="fp32",
                        help="the weights the decoding steps read on a CPU: fp32 (as trained), fp16 (half the bytes; "
                        "outputs move by ~1e-4 relative) or int8 (a quarter; ~1e-2, and the activations share one "
                        "scale per batch, so a prediction can depend on its batch). A step reads every weight, so "
                        "fewer bytes decode faster; prompt and loss passes stay fp32, bit for bit. Measured speed "
                        "and accuracy: README, Benchmarks, Packed weights (default: fp32)")


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    _weights_argument(parser)
    parser.add_argument("--prompt", action="append", default=[],
                        help="a prompt; repeat for a batch of prompts. \\n is a new line, \\t a tab, \\\\ a backslash "
                        "(as in --template)")
    parser.add_argument("--prompt-file", help="UTF-8 file with one prompt per line (blank lines are ignored)")
    prompt_format = parser.add_mutually_exclusive_group()
    prompt_format.add_argument("--raw", action="store_true",
                               help="with --model RUN_DIR: send the prompt as it is (default: in the run's format: an "
                               "instruct run's template around it; for a qa run the prompt is the context, then the "
                               "question on its last line)")
    prompt_format.add_argument("--chat", action="store_true",
                               help="the prompt as a user message in the tokenizer's chat template, with the "
                               "assistant's turn opened (instruct models such as SmolLM2-135M-Instruct)")
    add_options(parser, sampling_options())
    parser.add_argument("--num-samples", type=int, default=1, help="continuations per prompt (default: 1)")
    parser.add_argument("--stream", action="store_true", help="print the text token by token as it is generated")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best",
                        help="with --model RUN_DIR: which checkpoint of the run (default: best)")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="NAME|FILE",
                        help="start from a measured recipe (see `peftlab recipes`: cola, rotten_tomatoes, squad) or a "
                        "YAML file (a partial or whole config.yaml); --set and the options override it")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="set any config.yaml value by its name there, e.g. --set train.lr=3e-4 --set "
                        "adapter.targets=q,v (repeatable; the options below override it)")
    parser.add_argument("--output-dir", help="run directory (default: the recipe's, else runs/<task>-<model>-<method>)")
    add_options(parser, train_options())
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoints/last")
    parser.add_argument("--stop-after-epoch", type=int, help="stop after this epoch as if interrupted (resume later)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model and read the data, print the parameter report and the resolved plan "
                        "(examples, steps, warm-up, device, precision, output directory), stop")


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `peftlab train` or `peftlab distill`")
    parser.add_argument("--text", action="append", default=[],
                        help="an input; repeatable. \\n is a new line, \\t a tab, \\\\ a backslash. A qa run's input "
                        "is the context, then the question on its last line")
    parser.add_argument("--input", metavar="FILE",
                        help="inputs from FILE: FILE.jsonl holds one JSON object per line with the fields the run "
                        "reads (text; a qa run: context and question), any other file one text per line (blank "
                        "lines are skipped)")
    parser.add_argument("--output", metavar="FILE", help="write the JSON lines to FILE instead of standard output")
    parser.add_argument("--overwrite", action="store_true", help="replace --output FILE if it exists")
    parser.add_argument("--batch-size", type=int, help="inputs per batch (default: the run's evaluation batch size)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    parser.add_argument("--device", help="auto, cpu or cuda[:N] (default: the run's config.yaml's)")
    _weights_argument(parser)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", help="a run directory written by `peftlab train`")
    parser.add_argument("--split", default="validation", help="data split (default: validation)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    parser.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    parser.add_argument("--eval-limit", "--limit", dest="limit", type=int, default=0, metavar="N",
                        help="evaluate N evenly spaced examples of the split (default: all); the name `train` uses "
                        "for its evaluations; --limit, its old name here, still works")
    parser.add_argument("--predictions", metavar="FILE",
                        help="also write each example's origin, input, prediction and reference to FILE (JSON lines), "
                        "with the task's own scores and, for labels, the label names and probabilities")
    _weights_argument(parser)
    add_options(parser, RUN_PLACE_OPTIONS, prefix="where to evaluate (a run: instead of its config.yaml's): ")
    add_options(parser, eval_options("any"), prefix="how to evaluate (a run: instead of its config.yaml's): ")
    zero_shot = {dest: option for dest, option in eval_options("zero-shot").items() if dest not in eval_options("any")}
    add_options(parser, zero_shot, prefix="without RUN_DIR: ")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory written by `peftlab train`")
    parser.add_argument("output_dir", help="where to write the export")
    parser.add_argument("--format", choices=("peft", "merged"), default="peft",
                        help="peft: adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained; "
                        "merged: a plain model for from_pretrained (default: peft)")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which checkpoint (default: best)")
    parser.add_argument("--base-model", metavar="NAME_OR_PATH",
                        help="what the export names as its base model (peft's base_model_name_or_path): a hub id or "
                        "a path (default: the model's public hub id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct; a run "
                        "on a local model directory: that directory)")
    add_options(parser, RUN_PLACE_OPTIONS, prefix="instead of the run's config.yaml: ")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what is at OUTPUT_DIR even if it is not an earlier export of this run (never the "
                        "run itself or a folder holding it)")


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", nargs="?", help="grid file (YAML: output_dir, base, grid)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                       help="an axis of the grid, e.g. adapter.rank=16,128 (repeatable)")
    parser.add_argument("--output-dir", help="folder of the sweep's runs (default: the grid file's output_dir)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local: one run after the other; ray: Ray Tune trials, as many at once as the resources "
                       "allow (needs `pip install 'peftlab[ray]'`) (default: local)")
    parser.add_argument("--address", help="ray: the Ray cluster to use (default: a local Ray, started and stopped here)")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="ray: CPUs per trial (default: 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=0, help="ray: GPUs per trial (default: 0)")
    parser.add_argument("--stop-on-error", action="store_true",
                        help="stop at the first point that fails (default: go on with the other points, name each "
                        "failure as it happens and again at the end, mark it in the report, exit 2)")


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_OR_SWEEP",
                        help="run directories written by `peftlab train` (sweep folders with --by-method)")
    parser.add_argument("--by-method", action="store_true",
                        help="one row per run name across the given sweep folders (e.g. a CoLA and an RT sweep)")
    parser.add_argument("--output-dir", help="where report.md and the plots go (default: a new folder "
                        "reports/<date>-<time>/ under the current directory; printed at the end)")
    parser.add_argument("--html", metavar="OUT.html",
                        help="instead, one self-contained page: for each run its parameters, every evaluation, its "
                        "plots, config and command; for folders (a sweep, a distillation comparison) their tables and "
                        "plots too; several runs get the comparison table and plots")


def _prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true", help="convert again even if the cache is current")


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


COMMANDS = (
    Command("generate", "continue prompts with a language model (W0)", _generate_arguments,
            "peftlab.commands.generate:run_generate", "Continue prompts with a language model (W0)."),
    Command("train", "fine-tune a model on a task (W1: --task cola)", _train_arguments, "peftlab.commands.run:run_train",
            "Fine-tune a model on a task. Settings come from the defaults, then --recipe, then --set, then the options; "
            "everything lands in the run directory's config.yaml. --dry-run prints the resolved plan.", writes_runs=True),
    Command("predict", "predict with a trained run on your own inputs (JSON lines)", _predict_arguments,
            "peftlab.commands.predict:run_predict",
            "Predict with a trained run (classifier, instruct, qa, distilled student) on your own inputs, with the "
            "run's template, verbalisers, max length and prediction mode. One JSON line per input: the input, the "
            "prediction (a label name, or the generated answer) and, for labels, \"label\", \"label_names\" and "
            "\"probabilities\" (in label order); an instruct run adds the generated text. In Python: "
            "peftlab.load_run(RUN_DIR).predict([...])."),
    Command("eval", "evaluate a run's checkpoint, or an un-tuned model (zero-shot), on a split", _eval_arguments,
            "peftlab.commands.run:run_eval",
            "Evaluate a run's checkpoint on a split. The metrics go into the run: RUN_DIR/eval/<split>.json (with the "
            "data directory, checkpoint, limit and time); -last is added to the name for --checkpoint last and "
            "-data-<8 hex digits> for a --data-dir other than the run's, so no evaluation replaces another's (the same "
            "one again replaces its file). Without RUN_DIR: the un-tuned model given by --model, --task, "
            "--template ... (zero-shot; language-model tasks), printed only."),
    Command("export", "export a run's adapter for Hugging Face peft, or a merged model", _export_arguments,
            "peftlab.commands.run:run_export"),
    Command("sweep", "train a grid of runs, then one comparison table and one validation-loss plot", _sweep_arguments,
            "peftlab.commands.sweep:run_sweep_command",
            "Train every point of a grid (finished runs are skipped, interrupted ones resumed), then write "
            "<folder>/report.md, <folder>/val_loss.png and <folder>/score_vs_parameters.png. See "
            "`peftlab.commands.sweep` for the grid file format.", writes_runs=True),
    Command("report", "comparison table and plots of runs, or of sweeps by method (--by-method)", _report_arguments,
            "peftlab.commands.report:run_report",
            "report.md (a row per run: method, trainable parameters, best validation and test scores, seconds per "
            "epoch, validation examples/s), val_loss.png (validation loss of every run) and score_vs_parameters.png "
            "(score against trainable parameters, log x). With --by-method the arguments are sweep folders (a task's "
            "runs may span several, e.g. its extra seeds), runs of the same name are one row with a score column per "
            "task, and runs named <name>_seed<k> count as more seeds of <name>."),
    Command("preferences", "sample and score preference pairs on Rotten Tomatoes prompts (for DPO)",
            "peftlab.commands.preference_options:preference_arguments", "peftlab.commands.preferences:run_preferences",
            "Prompts = the first 2-8 tokens of Rotten Tomatoes reviews (seeded); the policy samples --samples "
            "completions of each; the reward run scores each whole review (P(positive)); every two samples of a "
            "prompt with different rewards make a pair, the higher chosen. JSON lines for `train --objective dpo`."),
    Command("frontier", "the reward-KL frontier of DPO runs: reference, best-of-N and each run (W7)",
            "peftlab.commands.frontier_options:frontier_arguments", "peftlab.commands.frontier:run_frontier",
            "Sample completions of held-out Rotten Tomatoes test prompts from each DPO run and from its reference, "
            "score them with a reward run (P(positive)) and measure each run's sequence KL(π‖π_ref) against its own "
            "reference; best-of-N sampling from the reference is drawn on its analytic KL bound log N - (N-1)/N. "
            "Writes frontier.json, frontier.md (the table), frontier.png (reward against KL) and samples.jsonl into "
            "--output-dir; `peftlab report DIR --html OUT.html` shows them."),
    Command("recipes", "list the measured recipes for `peftlab train --recipe NAME`", _no_arguments,
            "peftlab.commands.listing:run_recipes"),
    Command("models", "list known models and whether they are available here", _no_arguments,
            "peftlab.commands.listing:run_models"),
    Command("prepare", "convert SmolLM2-135M from its GGUF into the fp32 cache (once)", _prepare_arguments,
            "peftlab.commands.prepare:run_prepare"),
)


def all_commands() -> tuple[Command, ...]:
    """The built-in commands, then each registered workload's (in registration order)."""
    commands = COMMANDS + tuple(command for spec in registered_workloads() for command in spec.commands)
    names = [command.name for command in commands]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise PeftlabError(f"more than one command is named {', '.join(repeated)}: a workload's commands need names "
                           "of their own")
    return commands


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Parameter-efficient fine-tuning, instruction tuning, QA and distillation for GPT-2-class models.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in all_commands():
        subparser = subparsers.add_parser(command.name, help=command.help,
                                          description=command.description or command.help[:1].upper() + command.help[1:])
        command.add_arguments(subparser)
        subparser.set_defaults(command_spec=command)
    return parser


def _quiet_library_logs() -> None:
    """transformers' per-load progress bars and advice would drown peftlab's own output. Set through the environment
    (read when transformers is first imported) so commands that never load a model do not import it; a user's own
    setting of these variables wins."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    loaded = sys.modules.get("transformers.utils.logging")  # imported already (main() called from Python)
    if loaded is not None:
        loaded.set_verbosity_error()
        loaded.disable_progress_bar()


# The names transformers' TrainingArguments, peft and litgpt give some of our options, for "did you mean".
OTHER_TOOLS_NAMES = {"--learning-rate": "--lr", "--num-train-epochs": "--epochs", "--lora-r": "--rank",
                     "--lora-alpha": "--alpha", "--per-device-train-batch-size": "--batch-size",
                     "--per-device-eval-batch-size": "--eval-batch-size", "--gradient-accumulation-steps": "--grad-accum",
                     "--lr-scheduler-type": "--schedule", "--target-modules": "--targets", "--save-steps": "--save-every",
                     "--eval-steps": "--eval-every", "--report": "--report-to"}


def unrecognized(unknown: list[str], command_parser: argparse.ArgumentParser) -> str:
    """argparse's message for unknown arguments, with the closest option of the command ("did you mean")."""
    options = command_parser._option_string_actions
    hints = [f"{item} (did you mean {match}?)" if (match := _suggest(item.split("=")[0], options)) else item
             for item in unknown]
    return f"unrecognized arguments: {' '.join(hints)} (see `{command_parser.prog} --help`)"


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return subparsers.choices[command]


def _suggest(name: str, options) -> str | None:
    """Our option for a misspelled one, one with underscores, or another tool's name for it."""
    if not name.startswith("--"):
        return None
    name = name.replace("_", "-")
    if name in options:
        return name
    alias = OTHER_TOOLS_NAMES.get(name) or OTHER_TOOLS_NAMES.get(closest(name, OTHER_TOOLS_NAMES) or "")
    return alias if alias in options else closest(name, options)


# What a write failure inside a command that writes run directories (`Command.writes_runs`) leaves: every file and
# checkpoint there is replaced whole (fileio).
RUN_KEPT = "the run directory keeps what was written before it (files and checkpoints are replaced whole)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peftlab` console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command_parser = _command_parser(parser, args.command)
        command_parser.error(unrecognized(unknown, command_parser))
    args.command_line = shlex.join(["peftlab", *argv])
    _quiet_library_logs()
    try:
        args.command_spec.handler()(args)
    except Interrupted as error:
        print(f"peftlab {args.command}: interrupted: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return 130  # the shell's code for a command stopped by Ctrl-C
    except BrokenPipeError:  # the reader stopped reading (`peftlab recipes | head -1`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141  # the shell's code for a command stopped by SIGPIPE
    except PeftlabError as error:  # fileio's write failures too (WriteFailed: path, reason, what was kept)
        run_kept = f"; {RUN_KEPT}" if isinstance(error, OSError) and args.command_spec.writes_runs else ""
        print(f"peftlab {args.command}: error: {error}{run_kept}", file=sys.stderr)
        return 2
    except OSError as error:  # a write no peftlab writer wrapped (a library's, an appended line): one line, no traceback
        kept = RUN_KEPT if args.command_spec.writes_runs else "what was written before it is kept"
        print(f"peftlab {args.command}: error: {os_error_line(error, kept)}", file=sys.stderr)
        return 2
    return 0



if __name__ == "__main__":
    sys.exit(main())
