"""What `openelm bench --prompt-lookup/--draft-model` decodes: the target model at a precision, its
drafter, and the prompts of the four tasks (text for a checkpoint with a tokenizer, random token ids
for a released size with random weights)."""

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from openelm_mlx.checkpoint import resolve_source
from openelm_mlx.config import PRESETS, OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.generate import FALLBACK_PROMPT, GenerationOptions, make_drafter
from openelm_mlx.loader import DEMO_MODEL, DTYPES, load
from openelm_mlx.tokenizer import Tokenizer, check_tokenizer_fits, find_tokenizer

from .subjects import activation_dtype, build_subject, load_source
from .synthetic import random_weights

TASKS = ("free", "copy", "short", "fresh")
SHORT_IDS = 4  # the short prompt in random ids, for random weights
MIN_PROMPT = 8  # tokens: -g must leave at least this many in the context
# Passages for text prompts: the demo model's held-out text (never trained on), one chapter a line.
VALIDATION = DEMO_MODEL / "validation.txt"
FIXED = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God "
    "said, Let there be light: and there was light. And God saw the light, that it was good: and God divided "
    "the light from the darkness. And God called the light Day, and the darkness he called Night."
)
RANDOM_NOTE = (
    "random weights: the model does not copy and a random draft does not predict a random target, so "
    "acceptance and speed-up say nothing about real models (they show what drafting costs when it fails)"
)


def passages() -> List[str]:
    """Two passages of text: the free task's prompt, and the passage the copy task quotes."""
    lines = VALIDATION.read_text(encoding="utf-8").splitlines()[:2] if VALIDATION.is_file() else []
    return lines if len(lines) == 2 else [FIXED, FIXED]


def task_prompts(tokenizer: Optional[Tokenizer], vocab_size: int, budget: int, seed: int) -> Dict[str, List[int]]:
    """free: `budget` tokens of text (or random ids); copy: a passage of the budget's first three
    quarters followed by its first tokens again (after BOS), so the answer continues the copy;
    short: `openelm generate`'s default prompt, so nearly all the text is the model's own (the
    demo model's greedy text soon repeats itself); fresh: the free prompt's tokens after BOS in a
    seeded random order, so that no passage repeats and what the model writes is its own (drafts
    find chance matches and are rejected: what drafting costs when it does not pay)."""
    restart = max(1, budget // 4)
    if tokenizer is None:  # ids 0-2 are OpenELM's unk, BOS and EOS
        free, passage = np.random.default_rng(seed).integers(3, vocab_size, (2, budget)).tolist()
        short, skip = free[:SHORT_IDS], 0
    else:
        free, passage, short = (tokenizer.encode(text) for text in (*passages(), FALLBACK_PROMPT))
        skip = 1  # BOS
    passage, free = passage[: budget - restart], free[:budget]
    fresh = free[:skip] + np.random.default_rng(seed).permutation(free[skip:]).tolist()
    return {"free": free, "copy": passage + passage[skip : skip + restart], "short": short[:budget], "fresh": fresh}


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    return a.vocab_size == b.vocab_size and all(a.sp.id_to_piece(i) == b.sp.id_to_piece(i) for i in range(a.vocab_size))


class Subject:
    """A target model at one precision, with its tokenizer (None for random weights) and prompts."""

    def __init__(self, spec: str, precision: str, settings: dict, make_draft):
        config, make_weights = load_source(spec, settings["seed"])
        self.random = spec in PRESETS
        self.tokenizer = None if self.random else find_tokenizer(resolve_source(spec), required=False)
        if self.tokenizer is not None:
            check_tokenizer_fits(self.tokenizer, config)
        self.dtype = activation_dtype(precision, config)
        budget = min(settings["prompt_tokens"], config.max_context_length - settings["generation_tokens"])
        if budget < MIN_PROMPT:
            raise OpenELMError(
                f"-g {settings['generation_tokens']} leaves {max(budget, 0)} prompt tokens in the model's context "
                f"of {config.max_context_length}: lower -g (at least {MIN_PROMPT} prompt tokens are needed)"
            )
        self.prompts = task_prompts(self.tokenizer, config.vocab_size, budget, settings["seed"])
        self.draft = make_draft(spec, precision, self.dtype, self.tokenizer)  # first: it may refuse
        if self.draft is not None and self.draft.config.max_context_length < budget + settings["generation_tokens"]:
            raise OpenELMError(
                f"the draft model's context of {self.draft.config.max_context_length} is shorter than the model's"
            )
        self.model = build_subject(config, make_weights, precision)
        s = settings["speculation"]
        self.options = GenerationOptions(prompt_lookup=s["prompt_lookup"], num_draft=s["num_draft"])  # greedy
        self.drafter()  # checks the draft model's vocabulary before any timing

    def drafter(self):
        """A fresh drafter: a draft model's drafter holds a KV cache, so each decode gets its own."""
        return make_drafter(self.model, self.options, self.draft)

    def describe(self, task: str) -> dict:
        prompt = self.prompts[task]
        out = {
            "activation_dtype": str(self.dtype).replace("mlx.core.", ""),
            "prompt_kind": "random token ids" if self.tokenizer is None else "text",
            "prompt_tokens": len(prompt),
            "prompt": prompt if self.tokenizer is None else self.tokenizer.decode(prompt),
        }
        if self.random:
            out["note"] = RANDOM_NOTE
        return out

    def decoded(self, tokens: List[int]) -> dict:
        return {} if self.tokenizer is None else {"output_text": self.tokenizer.decode(tokens)}


class Subjects:
    """Builds each (model, precision) once, for its tasks; holds only the current one in memory."""

    def __init__(self, settings: dict):
        self.settings = settings
        s = settings["speculation"]
        name = Path(s["draft_model"]).name if s["draft_model"] else None
        self.drafter_label = f"prompt lookup, K={s['prompt_lookup']}" if name is None else f"{name}, K={s['num_draft']}"
        self.key, self.subject = None, None

    def get(self, spec: str, precision: str) -> Subject:
        if self.key != (spec, precision):
            self.key, self.subject = None, None  # free the previous model before building the next
            self.subject = Subject(spec, precision, self.settings, self.draft)
            self.key = (spec, precision)
        return self.subject

    def draft(self, spec: str, precision: str, dtype, tokenizer: Optional[Tokenizer]):
        """The draft model at the target's activation dtype: a released size gets random weights (a
        seed apart from the target's), a checkpoint is read by openelm_mlx.load."""
        draft = self.settings["speculation"]["draft_model"]
        if draft is None:
            return None
        if (spec in PRESETS) != (draft in PRESETS):
            raise OpenELMError(
                f"--draft-model {draft} and --models {spec}: a released size (random weights) takes a released "
                "size as its draft, a checkpoint a checkpoint with the same tokenizer"
            )
        if draft in PRESETS:
            config = OpenELMConfig.preset(draft)
            return build_subject(config, lambda: random_weights(config, self.settings["seed"] + 1), precision)
        model, own = load(draft, dtype=next(name for name, d in DTYPES.items() if d == dtype))
        if tokenizer is not None and not same_vocabulary(tokenizer, own):
            raise OpenELMError(f"the draft model {draft} has another tokenizer than {spec}: a draft must share it")
        return model
