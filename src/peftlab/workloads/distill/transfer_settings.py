"""What `peftlab transfer-set` samples: its settings, kept apart from the sampler (`transfer`) because the command
line builds its options from them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftlab.errors import PeftlabError
from peftlab.sampling import Sampling
from peftlab.settings import setting

# transfer-set's own sampling defaults, over `Sampling`'s (those of `peftlab generate`): sentences are short
# (32 tokens suffice), a little hotter than W0's text for variety, seed 0. The README's transfer sets were written
# with these; `peftlab transfer-set --temperature/--max-new-tokens/--seed` change them.
TRANSFER_SAMPLING = {"temperature": 0.9, "max_new_tokens": 32, "seed": 0}


@dataclass
class TransferSettings:
    """What a transfer set is made of; how each sentence is sampled is `sampling` (its seed also draws the
    prompts, so the same seed gives the same sentences)."""

    size: int = setting(8000, "sentences to write")
    shots: int = setting(2, "training sentences shown before each prefix, so the model writes in their style")
    prefix_words: int = setting(2, "words of a training sentence that start each sample")
    batch_size: int = setting(64, "prompts sampled together")
    sampling: Sampling = field(default_factory=lambda: Sampling(**TRANSFER_SAMPLING))


def check_transfer_settings(settings: TransferSettings) -> None:
    """Clear errors for settings that cannot work; run again after command-line options changed them."""
    settings.sampling.check()
    checks = [
        (settings.size >= 1, f"--size must be >= 1, got {settings.size}"),
        (settings.shots >= 0, f"--shots must be >= 0, got {settings.shots}"),
        (settings.prefix_words >= 0, f"--prefix-words must be >= 0, got {settings.prefix_words}"),
        (settings.batch_size >= 1, f"--batch-size must be >= 1, got {settings.batch_size}"),
        (not settings.sampling.greedy,
         f"--temperature must be > 0 (sampling), got {settings.sampling.temperature}: greedy decoding would write "
         "the same continuation for every repeated prompt"),
    ]
    for ok, message in checks:
        if not ok:
            raise PeftlabError(message)
