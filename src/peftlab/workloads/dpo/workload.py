"""The DPO workload (W7): preference pairs, the DPO loss, and the reference kept inside the policy model (the adapter
switched off, or an --init-from run's adapter frozen; see `reference`)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from peftlab.data.datasets import get_dataset
from peftlab.errors import PeftlabError
from peftlab.runs import RunDir
from peftlab.shared_prefix import block_mask_unsupported
from peftlab.workloads.base import Workload
from peftlab.workloads.dpo import REFERENCES, DPOConfig
from peftlab.workloads.dpo.reference import check_reference_possible, load_reference_state
from peftlab.workloads.dpo.task import DPOTask, Precompute


class DPOWorkload(Workload):
    """Direct preference optimisation of a language model's adapter against a reference it holds itself."""

    name = "dpo"

    def task_for(self, config, tokenizer) -> DPOTask:
        dpo = config.dpo or DPOConfig()
        dataset = get_dataset(config.task.name)
        data_dir = config.task.data_dir or dpo.preferences
        return DPOTask(lambda split: dataset.read(split, data_dir), tokenizer,
                       config.task.max_length or dataset.max_length, dpo.beta, dpo.label_smoothing, dpo.min_score_gap)

    def resolve(self, config, task: DPOTask) -> None:
        """--preferences becomes the run's data directory (so `peftlab eval` finds the pairs); the reference must be
        one DPO can hold, and evaluation unmerged (the reference switches the adapter off)."""
        super().resolve(config, task)
        dpo = config.dpo
        if dpo.reference not in REFERENCES:
            raise PeftlabError(f"--reference must be one of {', '.join(REFERENCES)}, got '{dpo.reference}'")
        if dpo.preferences and not Path(dpo.preferences).exists():
            raise PeftlabError(f"--preferences {dpo.preferences}: no such file or folder. Fix: give the pairs' JSONL "
                               "file (from `peftlab preferences`) or a folder with train.jsonl")
        if dpo.preferences and not config.task.data_dir:
            config.task.data_dir = dpo.preferences
        if config.train.merge_for_evaluation:
            raise PeftlabError("--merge-for-evaluation cannot be used with --objective dpo: the reference pass switches "
                               "the adapter off, which a merged adapter cannot do")
        task.encoding_is_costly = dpo.precompute_reference

    def build_model(self, config, task: DPOTask, device, fresh: bool, context) -> nn.Module:
        """The policy, refused when training would move the reference; the task gets the run's reference (read from
        the --init-from run's checkpoint file, also when resuming) and, with precompute_reference, what it needs."""
        model = super().build_model(config, task, device, fresh, context)
        check_reference_possible(model, config.adapter.method, config.adapter.extra_trainable or [])
        unsupported = block_mask_unsupported(model)
        if unsupported:
            print(f"Note: chosen and rejected completions do not share their prompt's pass: {unsupported}")
            task.shares_prefixes = False
        init = config.train.init_from
        try:
            task.reference_state = load_reference_state(
                model, RunDir(init).checkpoint(config.train.init_checkpoint) if init else None)
        except PeftlabError as error:
            raise PeftlabError(f"--init-from {init}: {error}") from None
        print(f"DPO reference: {task.reference_state.source}")
        if config.dpo.precompute_reference:
            task.precompute = Precompute(model, Path(config.output_dir) / "cache", config.model.name)
        return model
