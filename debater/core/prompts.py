"""How queries and documents become token ids: the single source of truth used
by preprocessing, training and inference alike.

Query    = [BOS] instruction + " " + query, truncated, then EOS (embedding: last token).
Document = [BOS] body truncated to fit, then a suffix that is never cut:
           - "step_tokens":  " " + deliberation prompt + " " + K step tokens, tokenized as one string as the
                             released code does (CoD views = last K positions); with an empty prompt the
                             step tokens follow the body directly
           - "last_k_tokens": EOS, views = last K positions (the SD-only ablation)
           - "last_token":   EOS, one view (the vanilla ablation)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

DOC_MODES = ("step_tokens", "last_k_tokens", "last_token")
DEFAULT_PROMPT = "Use {k} words to represent the above text in multiple aspects:"
MINICPM_FIRST_RESERVED = 12  # the released code uses <reserved_12> .. <reserved_19>
STEP_TOKEN_INITS = ("sampled", "eos")  # how the embedding rows of added step tokens start (model.grow_embeddings)
# Code-markup special tokens of StarCoder-style tokenizers (SmolLM2 ids 3..16): single ids that retrieval text
# never contains, so they can serve as step tokens the way the released code uses MiniCPM's reserved rows.
CODE_MARKUP_TOKENS = ("<repo_name>", "<reponame>", "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>",
                      "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
                      "<jupyter_output>", "<jupyter_script>", "<empty_output>")
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
    # body tokens kept (BOS included) whatever the suffix costs: documents are then body + suffix long.
    # None: the body gets what doc_max_length leaves after the suffix. Set it to compare formats fairly.
    doc_body_max_length: int | None = None

    def __post_init__(self) -> None:
        if self.doc_mode not in DOC_MODES:
            raise ValueError(f"doc_mode must be one of {DOC_MODES}, got {self.doc_mode!r}")
        if self.cod_steps < 1:
            raise ValueError("cod_steps must be >= 1")
        if self.doc_body_max_length is not None and self.doc_body_max_length < 1:
            raise ValueError("doc_body_max_length must be >= 1")

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


def step_tokens_unusable(tokenizer, settings: EncodingSettings) -> str | None:
    """Why ``settings.step_tokens`` are not ``cod_steps`` distinct single ids of ``tokenizer`` (None: they are, or
    the format has no step tokens): what a saved model's ``debater.json`` and tokenizer must agree on."""
    if settings.doc_mode != "step_tokens":
        return None
    tokens, k = settings.step_tokens, settings.cod_steps
    if len(tokens) != k:
        return f"{len(tokens)} step tokens for cod_steps={k}"
    ids = [_single_id(tokenizer, t) for t in tokens]
    missing = [t for t, i in zip(tokens, ids) if i is None]
    if missing:
        return f"the step tokens {missing} are not single tokens of its tokenizer"
    if len(set(ids)) != k:
        return f"the step tokens {tokens} are not {k} distinct token ids"
    return None


def existing_step_candidates(k: int) -> list[list[str]]:
    """Families of existing tokens that no ordinary text produces, in order of preference: MiniCPM's
    ``<reserved_12>``.. (the released code's choice), Llama 3's and Gemma's reserved rows, then StarCoder-style
    code markup (SmolLM2)."""
    families = [[f"<reserved_{MINICPM_FIRST_RESERVED + i}>" for i in range(k)],
                [f"<|reserved_special_token_{i}|>" for i in range(k)],
                [f"<unused{i}>" for i in range(k)]]
    if k <= len(CODE_MARKUP_TOKENS):
        families.append(list(CODE_MARKUP_TOKENS[:k]))
    return families


def resolve_step_tokens(tokenizer, settings: EncodingSettings) -> list[str]:
    """Pick K step tokens and make sure each is exactly one id.

    Configured tokens win; else the first family of existing reserved or unused tokens the tokenizer has
    whole (``existing_step_candidates``), as the released code uses MiniCPM's reserved rows; else dedicated
    ``<step_i>`` special tokens are added to the tokenizer (the caller must grow the embeddings).
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
        usable = [family for family in existing_step_candidates(k)
                  if all(_single_id(tokenizer, t) is not None for t in family)]
        wanted = usable[0] if usable else [f"<step_{i + 1}>" for i in range(k)]
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


def step_suffix_text(settings: EncodingSettings) -> str:
    """The deliberation suffix as text: `` prompt <step_1>..<step_K>`` (the step tokens alone without a prompt)."""
    prompt = settings.prompt_text()
    return f" {prompt} " + "".join(settings.step_tokens) if prompt else "".join(settings.step_tokens)


def step_suffix(tokenizer, settings: EncodingSettings) -> list[int]:
    """Ids of the deliberation suffix. The released code appends the string
    `` Use eight words ... aspects: <reserved_12><reserved_13>..`` to the text, so there is a space between
    the colon and the first step token; it is tokenized here as one string the same way."""
    steps = tokenizer.convert_tokens_to_ids(settings.step_tokens)
    prompt = settings.prompt_text()
    if not prompt:  # the step tokens follow the text directly
        return steps
    ids = tokenizer(step_suffix_text(settings), add_special_tokens=False).input_ids
    if ids[-len(steps):] != steps:
        raise ValueError(f"the step tokens {settings.step_tokens} do not stay single ids after the prompt "
                         f"{prompt!r} (got ids {ids[-len(steps):]}, expected {steps})")
    return ids


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
            self.doc_suffix = step_suffix(tokenizer, settings)
        else:
            self.doc_suffix = [self.eos_id]
        if settings.doc_body_max_length is None and len(self.doc_suffix) >= settings.doc_max_length:
            raise ValueError(
                f"doc_max_length={settings.doc_max_length} leaves no room for the document body "
                f"(the suffix alone is {len(self.doc_suffix)} tokens)")
        self.body_budget = settings.doc_body_max_length or settings.doc_max_length - len(self.doc_suffix)

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
        return [ids + self.doc_suffix for ids in self._encode(texts, self.body_budget)]
