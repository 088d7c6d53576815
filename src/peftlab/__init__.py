"""peftlab: parameter-efficient fine-tuning, instruction tuning, QA and distillation for GPT-2-class models."""

from peftlab.errors import PeftlabError

__version__ = "0.1.0"

__all__ = ["PeftlabError", "__version__"]
