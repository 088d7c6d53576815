"""How text is sampled: the one settings class of `peftlab generate`, `peftlab transfer-set` and every workload
that generates, with one set of defaults (W0's `peftlab generate`).

The fields are documented with `peftlab.settings.setting`, so the command-line options of every command that
samples are generated from this class (`peftlab.options.documented_fields(Sampling, None)`). A command that
needs other defaults keeps them as a dict of overrides (e.g. `workloads.distill.transfer.TRANSFER_SAMPLING`),
which its `--help` shows, instead of defining its own class. This module imports no torch, so a
command line can be built from it cheaply; the token picker that applies it lives in `peftlab.generation`.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.errors import PeftlabError
from peftlab.settings import setting


@dataclass
class Sampling:
    """Greedy when temperature is 0, else sampled from softmax(logits / temperature) among the `top_k` most
    likely tokens (0 = all) up to probability mass `top_p` (1 = all), with its own seeded generator.

    The first four fields keep their positional order (temperature, top_k, top_p, seed)."""

    temperature: float = setting(0.8, "sampling temperature; 0 = greedy")
    top_k: int = setting(200, "sample among the k most likely tokens; 0 = off")
    top_p: float = setting(0.95, "nucleus sampling threshold; 1 = off")
    seed: int = setting(1337, "random seed; same seed, same text")
    max_new_tokens: int = setting(200, "tokens to generate at most")
    stop: list[str] = setting([], "comma-separated strings that end a continuation once its text contains one "
                              "(kept in the text); the end-of-text token always does")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Clear errors for settings that cannot work; call it again after changing fields (command-line options)."""
        checks = [
            (self.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1] (1 = off), got {self.top_p}"),
            (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (all(self.stop), "--stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise PeftlabError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
