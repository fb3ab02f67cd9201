"""Knowledge distillation: a student learns from a teacher's output distribution.

Hinton, Vinyals & Dean 2015 (arXiv 1503.02531); DistilBERT (Sanh et al. 2019, arXiv 1910.01108);
generalised JSD as in GKD (Agarwal et al. 2024, arXiv 2306.13649). With teacher logits t and
student logits s over the same V classes (tokens, or a classifier's labels) at each scored
position, temperature T, p = softmax(t / T) and q = softmax(s / T):

    kl          T^2 * KL(p || q) = T^2 * sum_v p_v (log p_v - log q_v)        (forward, mean-seeking)
    reverse_kl  T^2 * KL(q || p)                                              (mode-seeking)
    jsd         T^2 * [beta KL(p || m) + (1 - beta) KL(q || m)],  m = beta p + (1 - beta) q
    hard        -log softmax(s)[y]  (the true label / next token, at T = 1)
    hidden      1 - cos(h_s, h_t)   (last hidden states at real tokens; widths must match)

The T^2 factor keeps the soft-target gradients' scale independent of T (Hinton et al. 2015).
The objective is the weighted sum of the terms whose weight is non-zero; each term is summed over
the scored positions (supervised tokens of a causal LM, one per sequence for a classifier) and
the loop divides by their number. Each loss is its own function found by name in ``LOSSES``.

The teacher either runs in ``no_grad`` on the same batch (``teacher_cache: online``), or its
top-k log-probs were computed once and ride in the batch (``offline``, ``teacher_cache.py``):
at each scored position, l = log softmax(t) and K = the ids of the k largest l. The soft losses
then compare both distributions restricted to K and renormalised,

    p~ = softmax(l_K / T),   q~ = softmax(s_K / T),

which are proper distributions over K, so KL, reverse KL and JSD stay finite and well-defined.
softmax is shift-invariant, so l_K / T gives the same p~ as t_K / T: a cache made at T = 1
serves every temperature (and the top k are the same ids at every T). With k >= V, p~ = p and
q~ = q: the loss is the online loss. What top-k leaves out: the teacher's tail mass outside K and
the student's mass there get no soft target (``hard`` still scores the true token); a tail
bucket would keep that mass, but its size depends on T, so the cache would be tied to one T.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.batching import Batch
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.objectives.sft import keep_positions
from tunesmith.paths import cache_root


def kl_divergence(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    """(N,) T^2 KL(p || q) per position, p = softmax(teacher / T), q = softmax(student / T)."""
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * t * t


def reverse_kl(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    """(N,) T^2 KL(q || p): the student's mass where the teacher has little is penalised."""
    return kl_divergence(student, teacher, t)


def generalised_jsd(
    teacher: torch.Tensor, student: torch.Tensor, t: float, beta: float = 0.5
) -> torch.Tensor:
    """(N,) T^2 [beta KL(p || m) + (1 - beta) KL(q || m)], m = beta p + (1 - beta) q.

    beta = 0.5 is the symmetric Jensen-Shannon divergence; it tends to forward KL's gradients as
    beta -> 0 and reverse KL's as beta -> 1 (after dividing by beta or 1 - beta)."""
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    if beta <= 0.0 or beta >= 1.0:
        raise ConfigError(f"distill.jsd_beta: got {beta}; must be in (0, 1).")
    log_m = torch.logsumexp(
        torch.stack(
            [log_p + torch.log(torch.tensor(beta)), log_q + torch.log(torch.tensor(1 - beta))]
        ),
        dim=0,
    )
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (beta * kl_pm + (1 - beta) * kl_qm) * t * t


def hard_label(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) cross-entropy of the true labels (the data's own targets), at temperature 1."""
    return F.cross_entropy(student.float(), targets, reduction="none")


def cosine_alignment(teacher_h: torch.Tensor, student_h: torch.Tensor) -> torch.Tensor:
    """(N,) 1 - cos(h_s, h_t) per token."""
    return 1.0 - F.cosine_similarity(student_h.float(), teacher_h.float(), dim=-1)


@dataclass
class DistillWeights:
    kl: float = 1.0
    """Forward KL(teacher || student) on temperature-softened distributions (x T^2)."""
    reverse_kl: float = 0.0
    """Reverse KL(student || teacher) (x T^2)."""
    jsd: float = 0.0
    """Generalised Jensen-Shannon divergence with ``jsd_beta`` (x T^2)."""
    hard: float = 0.0
    """Cross-entropy of the true labels / next tokens."""
    hidden: float = 0.0
    """1 - cosine of the student's and teacher's last hidden states (widths must match)."""


@dataclass
class DistillConfig:
    teacher: str | None = None
    """The teacher: a model folder, a hub id, or a tunesmith run folder (of the same tokenizer);
    null with ``student`` set: ``model`` is the teacher and the student is built from it."""
    temperature: float = 2.0
    """Softmax temperature T of the soft targets (the soft losses are scaled by T^2)."""
    jsd_beta: float = 0.5
    """beta of the generalised JSD (0.5: symmetric)."""
    weights: DistillWeights = field(default_factory=DistillWeights)
    """Weight of each loss term; terms with weight 0 are not computed."""
    teacher_dtype: str = "float32"
    """Dtype the teacher is loaded in (``bfloat16`` halves its memory on a GPU)."""
    student: StudentConfig | None = None
    """Build the student from the teacher (DistilBERT's recipe); null: ``model`` is the student."""
    teacher_cache: str = "online"
    """``online``: the teacher runs on every batch. ``offline``: its top-k log-probs are computed
    once, cached on disk (``<cache>/teacher/``, keyed by teacher, data and k) and reused by later
    runs, which then never load the teacher while training (``hidden`` needs ``online``)."""
    top_k: int = 32
    """Teacher log-probs kept per scored position when offline (all of a classifier's classes
    when it has no more than k)."""

    def check(self, prefix: str) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: got {self.temperature}; must be > 0.")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ConfigError(f"{prefix}.jsd_beta: got {self.jsd_beta}; must be in (0, 1).")
        w = self.weights
        values = {k: getattr(w, k) for k in LOSSES}
        if any(v < 0 for v in values.values()) or not any(values.values()):
            raise ConfigError(
                f"{prefix}.weights: got {values}; give non-negative weights, at least one above 0."
            )
        if self.teacher_cache not in ("online", "offline"):
            raise ConfigError(
                f"{prefix}.teacher_cache: got {self.teacher_cache!r}; allowed: online, offline."
            )
        if self.top_k < 1:
            raise ConfigError(f"{prefix}.top_k: got {self.top_k}; must be >= 1.")
        if self.teacher_cache == "offline" and w.hidden > 0:
            raise ConfigError(
                f"{prefix}.weights.hidden: hidden-state alignment needs the teacher's hidden states, "
                f"which the offline cache does not keep; set {prefix}.teacher_cache=online or hidden to 0."
            )
        if self.teacher_dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ConfigError(
                f"{prefix}.teacher_dtype: got {self.teacher_dtype!r}; allowed: float32, bfloat16, float16, auto."
            )


@dataclass
class StudentConfig:
    init: str = "from_teacher"
    """``from_teacher``: copy the teacher's embeddings, head and the chosen layers (same width)."""
    layers: list[int] | None = None
    """Teacher layers the student keeps, in order; null keeps every other one (0, 2, 4, ...)."""

    def check(self, prefix: str) -> None:
        if self.init != "from_teacher":
            raise ConfigError(
                f"{prefix}.init: got {self.init!r}; only 'from_teacher' (or set distill.student: null "
                "and give the student as model)."
            )
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise ConfigError(
                f"{prefix}.layers: got {self.layers}; give teacher layer indices >= 0."
            )


CACHE_FOLDER = "teacher"
"""Where offline teacher log-probs live under ``paths.cache_root()``."""

# Names of the losses (and weights) that compare distributions: (teacher, student, T, cfg) -> (N,).
SOFT: dict[str, Callable[[torch.Tensor, torch.Tensor, DistillConfig], torch.Tensor]] = {
    "kl": lambda t, s, c: kl_divergence(t, s, c.temperature),
    "reverse_kl": lambda t, s, c: reverse_kl(t, s, c.temperature),
    "jsd": lambda t, s, c: generalised_jsd(t, s, c.temperature, c.jsd_beta),
}
LOSSES = (*SOFT, "hard", "hidden")


def vocab_width(tokenizer: Any, student: nn.Module, teacher: nn.Module) -> int:
    """The number of real classes both models score: the tokenizer's size for language models
    (embedding matrices are often padded to a multiple of 64 with unused rows), else the heads'
    common width. Different tokenizers stop with one line."""
    s = student.get_output_embeddings() if hasattr(student, "get_output_embeddings") else None
    t = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if s is None or t is None:  # a classifier: the class lists were checked when labels were set
        ks, kt = student.config.num_labels, teacher.config.num_labels
        if ks != kt:
            raise TunesmithError(
                f"distill.teacher: the teacher has {kt} classes and the student {ks}; they must share the class list."
            )
        return ks
    return len(tokenizer)


def check_same_vocabulary(student_tok: Any, teacher_tok: Any, teacher: str) -> None:
    """One line when the teacher's tokenizer is not the student's (ids would mean other tokens)."""
    a, b = student_tok.get_vocab(), teacher_tok.get_vocab()
    if a != b:
        differ = sorted(set(a.items()) ^ set(b.items()), key=lambda kv: kv[1])[:2]
        raise TunesmithError(
            f"distill.teacher: {teacher} has another vocabulary ({len(b):,} tokens vs the student's "
            f"{len(a):,}; e.g. {differ}); distillation compares distributions over the same token "
            "ids, so use a teacher and a student that share one tokenizer."
        )


def scored_logits(
    model: nn.Module, batch: Batch, token_level: bool, width: int, hidden: bool = False
) -> tuple[torch.Tensor, Any]:
    """((N, width) logits at the scored positions, the model output): supervised tokens of a
    causal LM in batch order (as ``labels[supervised]``), or one row per sequence."""
    kwargs: dict[str, Any] = {"use_cache": False, "output_hidden_states": hidden}
    if token_level:
        keep, take = keep_positions(model, batch.supervised)
        kwargs |= keep
    out = model(**batch.model_inputs(), **kwargs)
    logits = take(out.logits) if token_level else out.logits  # (N, V) or (B, V)
    return logits[..., :width], out


class DistillObjective:
    """The weighted distillation loss against a frozen teacher run on the same batch (online), or
    against the teacher's top-k log-probs the batch carries (``teacher_logp``, ``teacher_index``;
    ``teacher`` is then None)."""

    name = "distill"

    def __init__(
        self, cfg: DistillConfig, teacher: nn.Module | None, width: int, token_level: bool
    ) -> None:
        self.cfg = cfg
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        self.width = width
        self.token_level = token_level
        self.terms = {k: getattr(cfg.weights, k) for k in LOSSES if getattr(cfg.weights, k) > 0}

    def count(self, batch: Batch) -> int:
        return batch.n_supervised if self.token_level else batch.input_ids.shape[0]

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = "hidden" in self.terms
        s_logits, s_out = scored_logits(model, batch, self.token_level, self.width, hidden)
        if "teacher_logp" in batch.extras:  # offline: soft losses over the teacher's top k
            index = batch.extras["teacher_index"].long()
            if index.shape[0] != s_logits.shape[0]:
                raise TunesmithError(
                    f"distill: the cached teacher has {index.shape[0]} positions for a batch that "
                    f"scores {s_logits.shape[0]}; delete {cache_root() / CACHE_FOLDER} and run again."
                )
            t_soft, s_soft, t_out = batch.extras["teacher_logp"], s_logits.gather(-1, index), None
            t_top = index[:, 0]
        elif self.teacher is None:
            raise TunesmithError(
                "distill: the batch carries no cached teacher log-probs and no teacher is loaded."
            )
        else:
            with torch.no_grad():
                t_soft, t_out = scored_logits(
                    self.teacher, batch, self.token_level, self.width, hidden
                )
            s_soft, t_top = s_logits, t_soft.argmax(-1)
        total = s_logits.new_zeros(())
        metrics: dict[str, float] = {}
        for name, w in self.terms.items():
            if name in SOFT:
                per = SOFT[name](t_soft, s_soft, self.cfg)
            elif name == "hard":
                targets = (
                    batch.labels[batch.supervised] if self.token_level else batch.extras["label"]
                )
                per = hard_label(s_logits, targets)
            else:
                per = self._hidden(batch, t_out, s_out)
            part = per.sum()
            total = total + w * part
            metrics[name] = float(part.detach())
        # Agreement with the teacher's top choice: a student-vs-teacher accuracy.
        metrics["agreement"] = float((s_logits.argmax(-1) == t_top).sum())
        if not self.token_level:
            metrics["accuracy"] = float((s_logits.argmax(-1) == batch.extras["label"]).sum())
        return total, metrics

    def _hidden(self, batch: Batch, t_out: Any, s_out: Any) -> torch.Tensor:
        h_t, h_s = t_out.hidden_states[-1], s_out.hidden_states[-1]  # (B, T, H)
        if h_t.shape[-1] != h_s.shape[-1]:
            raise ConfigError(
                f"distill.weights.hidden: the teacher's hidden size {h_t.shape[-1]} differs from the "
                f"student's {h_s.shape[-1]}; cosine alignment needs equal widths (set it to 0)."
            )
        mask = batch.supervised if self.token_level else batch.attention_mask.bool()
        per_token = cosine_alignment(h_t[mask], h_s[mask])
        if self.token_level:
            return per_token
        # One value per sequence: the mean over its real tokens.
        rows = mask.nonzero()[:, 0]
        sums = torch.zeros(mask.shape[0], device=per_token.device).index_add(0, rows, per_token)
        return sums / mask.sum(1).clamp(min=1)
