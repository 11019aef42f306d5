"""How queries and documents become token ids: the single source of truth used
by preprocessing, training and inference alike.

Query    = [BOS] instruction + " " + query, truncated, then EOS (embedding: last token).
Document = [BOS] body truncated to fit, then a suffix that is never cut:
           - "step_tokens":  deliberation prompt + K step tokens (CoD views = last K positions)
           - "last_k_tokens": EOS, views = last K positions (the SD-only ablation)
           - "last_token":   EOS, one view (the vanilla ablation)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

DOC_MODES = ("step_tokens", "last_k_tokens", "last_token")
DEFAULT_PROMPT = "Use {k} words to represent the above text in multiple aspects:"
MINICPM_FIRST_RESERVED = 12  # the released code uses <reserved_12> .. <reserved_19>
STEP_TOKEN_INITS = ("mean", "eos")  # how the embedding rows of added step tokens start (model.grow_embeddings)
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten", "eleven", "twelve"]


@dataclass
class EncodingSettings:
    """Everything needed to turn text into ids the way a model was trained; saved with adapters."""

    doc_mode: str = "step_tokens"
    cod_steps: int = 8
    deliberation_prompt: str = DEFAULT_PROMPT
    step_tokens: list[str] = field(default_factory=list)  # filled by resolve_step_tokens
    query_max_length: int = 512
    doc_max_length: int = 512

    def __post_init__(self) -> None:
        if self.doc_mode not in DOC_MODES:
            raise ValueError(f"doc_mode must be one of {DOC_MODES}, got {self.doc_mode!r}")
        if self.cod_steps < 1:
            raise ValueError("cod_steps must be >= 1")

    @property
    def num_views(self) -> int:
        return 1 if self.doc_mode == "last_token" else self.cod_steps

    def prompt_text(self) -> str:
        k = self.cod_steps
        return self.deliberation_prompt.format(k=NUMBER_WORDS[k] if k < len(NUMBER_WORDS) else str(k))

    def to_dict(self) -> dict:
        return asdict(self)


def _single_id(tokenizer, token: str) -> int | None:
    ids = tokenizer.convert_tokens_to_ids([token])
    if len(ids) != 1 or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        return None
    encoded = tokenizer(token, add_special_tokens=False).input_ids
    return ids[0] if encoded == [ids[0]] else None


def resolve_step_tokens(tokenizer, settings: EncodingSettings) -> list[str]:
    """Pick K step tokens and make sure each is exactly one id.

    Configured tokens win; else MiniCPM's ``<reserved_12>``.. when the
    tokenizer has them; else dedicated ``<step_i>`` special tokens are added to
    the tokenizer (the caller must resize the embeddings and train those rows).
    Returns the tokens that had to be added.
    """
    if settings.doc_mode != "step_tokens":
        settings.step_tokens = []
        return []
    k = settings.cod_steps
    if settings.step_tokens:
        if len(settings.step_tokens) != k:
            raise ValueError(f"step_tokens has {len(settings.step_tokens)} entries but cod_steps is {k}")
        wanted = list(settings.step_tokens)
    else:
        reserved = [f"<reserved_{MINICPM_FIRST_RESERVED + i}>" for i in range(k)]
        wanted = reserved if all(_single_id(tokenizer, t) is not None for t in reserved) else [
            f"<step_{i + 1}>" for i in range(k)]
    missing = [t for t in wanted if _single_id(tokenizer, t) is None]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    bad = [t for t in wanted if _single_id(tokenizer, t) is None]
    if bad:
        raise ValueError(f"step tokens {bad} do not map to a single token id even after adding them")
    if len({_single_id(tokenizer, t) for t in wanted}) != k:
        raise ValueError(f"step tokens {wanted} are not {k} distinct ids")
    settings.step_tokens = wanted
    return missing


class TextFormatter:
    """Batch tokenisation of queries and documents with the never-cut suffix."""

    def __init__(self, tokenizer, settings: EncodingSettings):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; queries end with EOS")
        self.tokenizer = tokenizer
        self.settings = settings
        self.eos_id = tokenizer.eos_token_id
        if settings.doc_mode == "step_tokens":
            if len(settings.step_tokens) != settings.cod_steps:
                raise ValueError("call resolve_step_tokens before building a TextFormatter")
            prompt = settings.prompt_text()  # may be empty: the step tokens then follow the text directly
            prompt_ids = tokenizer(" " + prompt, add_special_tokens=False).input_ids if prompt else []
            self.doc_suffix = prompt_ids + tokenizer.convert_tokens_to_ids(settings.step_tokens)
        else:
            self.doc_suffix = [self.eos_id]
        if len(self.doc_suffix) >= settings.doc_max_length:
            raise ValueError(
                f"doc_max_length={settings.doc_max_length} leaves no room for the document body "
                f"(the suffix alone is {len(self.doc_suffix)} tokens)")

    def _encode(self, texts: Sequence[str], budget: int) -> list[list[int]]:
        """Ids with special tokens, truncated to ``budget``. A fast tokenizer's Rust backend is called
        directly: the same ids as ``tokenizer(...)`` without building the unused masks (~30% of the time)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self.tokenizer(list(texts), add_special_tokens=True, truncation=True,
                                  max_length=budget).input_ids
        backend.no_padding()
        backend.enable_truncation(budget, direction=self.tokenizer.truncation_side)
        return [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=True)]

    def queries(self, texts: Sequence[str], instructions: Sequence[str]) -> list[list[int]]:
        joined = [f"{inst} {text}" if inst else text for inst, text in zip(instructions, texts)]
        return [ids + [self.eos_id] for ids in self._encode(joined, self.settings.query_max_length - 1)]

    def documents(self, texts: Sequence[str]) -> list[list[int]]:
        budget = self.settings.doc_max_length - len(self.doc_suffix)
        return [ids + self.doc_suffix for ids in self._encode(texts, budget)]
