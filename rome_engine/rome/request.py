"""An edit request: which fact to rewrite, checked and normalised on construction.

    req = EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome")
    req.prompt   # "The {} is in"   (the subject's first occurrence became "{}")
    req.target   # " Rome"          (a leading space: the prompt ends in a word)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import InvalidRequest

SLOT = "{}"
MAX_HPARAMS = 64  # overrides one request may carry (every method has fewer hyperparameters)


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``subject`` + ``prompt`` -> ``target``.

    ``prompt`` is a template with one "{}" where the subject goes, or a text
    containing the subject (its first occurrence becomes the "{}"). After
    construction ``prompt`` is always the template and ``target`` carries the
    leading space that byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM)
    expect after a word; a trailing space of the prompt moves onto the target.
    """

    prompt: str
    subject: str
    target: str
    layer: int | None = None
    hparams: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.subject.strip():
            raise InvalidRequest("subject must not be empty")
        if not self.target.strip():
            raise InvalidRequest("target must not be empty: give the new object, e.g. ' Rome'")
        if self.layer is not None and (isinstance(self.layer, bool) or self.layer < 0):
            raise InvalidRequest(f"layer must be >= 0 (or unset for the model's default), got {self.layer}")
        if len(self.hparams) > MAX_HPARAMS:
            raise InvalidRequest(f"at most {MAX_HPARAMS} hparams may be set, got {len(self.hparams)}")
        for name in self.hparams:  # the names each method knows are checked by its hyperparameters
            if not (isinstance(name, str) and 0 < len(name) <= 64 and name.isidentifier()):
                raise InvalidRequest(f"hparam name {name!r:.80} is not a hyperparameter's name")
        for name, value in self.hparams.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequest(f"hparam {name} must be a finite number, got {value!r}")
        template = to_template(self.prompt, self.subject)
        target = self.target
        if template.endswith((" ", "\t")):
            template = template.rstrip(" \t")
            target = target if target[0].isspace() else " " + target
        elif needs_space(template, target):
            target = " " + target
        object.__setattr__(self, "prompt", template)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "hparams", MappingProxyType(dict(self.hparams)))

    def filled(self) -> str:
        """The prompt with the subject in place."""
        return fill(self.prompt, self.subject)


def to_template(prompt: str, subject: str) -> str:
    """``prompt`` as a template with exactly one "{}"."""
    if not prompt.strip():
        raise InvalidRequest("prompt must not be empty")
    n_slots = prompt.count(SLOT)
    if n_slots > 1:
        raise InvalidRequest(f"prompt {prompt!r} has {n_slots} '{{}}' slots: use exactly one, for the subject")
    if n_slots == 1:
        return prompt
    at = prompt.find(subject)
    if at < 0:
        raise InvalidRequest(
            f"subject {subject!r} does not occur in prompt {prompt!r}: include the subject verbatim "
            "(case-sensitive) or write the prompt as a template with '{}' where the subject goes"
        )
    return prompt[:at] + SLOT + prompt[at + len(subject) :]


def fill(template: str, subject: str) -> str:
    """The template with the subject in its slot (no str.format: other braces stay as they are)."""
    return template.replace(SLOT, subject, 1)


def needs_space(prompt: str, continuation: str) -> bool:
    """Whether ``continuation`` needs a leading space to read as the next word after ``prompt``.

    Byte-level BPE tokenizers encode the space as part of the next word
    (" Rome" is one token, "Rome" another), and a SentencePiece tokenizer
    reads "inRome" as one word too, so a word after a word gets a space.
    """
    if not continuation or continuation[0].isspace() or not prompt:
        return False
    after_word = prompt[-1].isalnum() or prompt[-1] in ",;:.!?)]"
    return after_word and continuation[0] not in ".,;:!?)]}'"
