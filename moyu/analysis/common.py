"""Helpers shared by the analyses: settings, token spans, raw activation runs, set overlap."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..arch import MLPLayer, mlp_layers
from ..capture import capture_raw
from ..predictor import topk_mask  # noqa: F401 - the analyses' shared top-k helper
from ..errors import MoyuError


@dataclass
class AnalyzeConfig:
    """Every knob of ``moyu analyze``; the defaults finish in minutes on 2 CPU cores.

    ``tokens`` is the streamed part (over-activation statistics): memory does not grow
    with it. The other analyses use small fixed spans held raw.
    """

    tokens: int = 768             # eval tokens streamed through the over-activation statistics
    corpus: str = "prose"         # built-in text: prose or code (moyu.data.CORPORA)
    window: int = 256             # forward window of the streamed part (BOS prepended)
    cett_tokens: int = 64         # token subsample for the exact CETT curves (per layer)
    cett_grid: int = 40           # keep ratios 0, 1/G, ..., 1 on the CETT curve
    hh_keep: float = 0.3          # heavy hitters: "active" = in the token's top hh_keep kept set
    hh_rate: float = 0.9          # heavy hitter = active for more than this share of tokens
    ks: tuple[float, ...] = (0.1, 0.3, 0.5)   # top-k ratios for set overlaps
    histories: int = 8            # K histories per probe (half natural text, half random tokens)
    history_len: int = 32
    probes: int = 2               # probe spans
    probe_len: int = 16
    predictor_tokens: int = 768   # calibration tokens to fit the low-rank predictor
    predictor_eval: int = 256     # held-out eval tokens to score it
    rank: int = 32
    predictor_steps: int = 0   # closed-form reduced-rank ridge is the MSE optimum
    inertia_seqs: int = 6         # natural sentences, and as many random-token sequences
    inertia_len: int = 80
    first_n: int = 16             # "first activations": the first n tokens choose the set
    prompt_n: int = 256           # second inertia run: the set chosen from a prompt this long
                                  # (the sequence methods' prompt length); 0 skips it
    inertia_k: float = 0.3
    inertia_tolerance: float = 0.05  # random >= natural - tolerance counts as semantic-irrelevant
    consistency_seqs: int = 2
    consistency_len: int = 8
    seed: int = 0

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        d = asdict(self)
        d["ks"] = list(self.ks)
        return d

    def validate(self, d_ff: int) -> None:
        """One-line :class:`MoyuError` for settings the analyses cannot use."""
        if self.tokens < 128:
            raise MoyuError(f"--tokens {self.tokens} is too small: need >= 128 so heavy-hitter "
                            "rates (> 90 % of tokens) and the CETT subsample mean something")
        for k in (*self.ks, self.hh_keep, self.inertia_k):
            if not 0 < k < 1 or round(k * d_ff) < 1:
                raise MoyuError(f"top-k ratio {k} gives no neurons out of d_ff={d_ff}: use a ratio "
                                f"in ({1 / d_ff:.4f}, 1)")
        if self.histories < 4:
            raise MoyuError(f"--histories {self.histories} is too few: need >= 4 (half natural, "
                            "half random) to compare histories")
        if self.first_n >= self.inertia_len - 8:
            raise MoyuError(f"--first-n {self.first_n} leaves too few later tokens in a "
                            f"{self.inertia_len}-token sequence: use < {self.inertia_len - 8}")
        if self.prompt_n and self.prompt_n <= self.first_n:
            raise MoyuError(f"--prompt-n {self.prompt_n} must be longer than --first-n {self.first_n} "
                            "(or 0 to skip the long-prompt inertia run)")
        if self.window < 16 or self.cett_grid < 4 or self.rank < 1:
            raise MoyuError("window must be >= 16, cett grid >= 4 and rank >= 1")


def kcount(ratio: float, d_ff: int) -> int:
    """Neurons kept at top-k ratio ``ratio`` (at least 1)."""
    return max(1, round(ratio * d_ff))


def jaccard(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """Jaccard index of boolean masks along the last axis (0/0 counts as 1)."""
    inter = (m1 & m2).sum(-1).float()
    union = (m1 | m2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def bos_prefix(model: nn.Module, tok) -> torch.Tensor:
    """``[bos]`` where the model's tokenizer starts a text with one (Gemma), else empty.

    The same rule as evaluation and calibration windows (:func:`moyu.data.bos_id`); without
    a tokenizer, the answer :func:`moyu.models.load` recorded on the model (``moyu_bos``).
    """
    from ..data import bos_id
    bos = bos_id(tok) if tok is not None else getattr(model, "moyu_bos", None)
    if bos is not None and not 0 <= int(bos) < int(model.config.vocab_size):
        bos = None                                   # e.g. a tiny GPT-2 keeps the 50256 default
    return torch.tensor([] if bos is None else [int(bos)], dtype=torch.long)


def random_ids(n: int, vocab: int, gen: torch.Generator, avoid: set[int] | None = None) -> torch.Tensor:
    """``n`` uniform random token ids in ``[0, vocab)``, re-drawing ids in ``avoid`` (specials)."""
    ids = torch.randint(0, vocab, (n,), generator=gen)
    if avoid:
        bad = torch.tensor(sorted(avoid))
        while True:
            m = torch.isin(ids, bad)
            if not m.any():
                break
            ids[m] = torch.randint(0, vocab, (int(m.sum()),), generator=gen)
    return ids


def run_acts(model: nn.Module, ids: torch.Tensor, what: tuple[str, ...] = ("act",)
             ) -> dict[str, dict[int, torch.Tensor]]:
    """One forward of ``ids [B, T]``; returns ``{stream: {layer: [B, T, width]}}`` for every layer."""
    with capture_raw(model, None, what) as raw, torch.inference_mode():
        model(ids, logits_to_keep=1)
    return {w: {i: ts[0] for i, ts in per.items()} for w, per in raw.items()}


@dataclass
class Spans:
    """Token spans the analyses use, cut from disjoint parts of the text."""

    stream: torch.Tensor                 # eval ids for the streamed statistics
    probes: list[torch.Tensor]           # probe spans (eval)
    natural_histories: list[torch.Tensor]
    random_histories: list[torch.Tensor]
    inertia_natural: list[torch.Tensor]
    inertia_random: list[torch.Tensor]
    prompt_natural: list[torch.Tensor]   # inertia from a prompt_n-token prompt (eval)
    prompt_random: list[torch.Tensor]
    pred_train: torch.Tensor             # calib
    pred_eval: torch.Tensor              # eval, held out
    consistency: list[torch.Tensor]
    bos: torch.Tensor = field(default_factory=lambda: torch.tensor([], dtype=torch.long))


def eval_needed(cfg: AnalyzeConfig) -> int:
    """Eval-split tokens the spans need."""
    return (cfg.tokens + cfg.probes * cfg.probe_len + cfg.inertia_seqs * cfg.inertia_len
            + cfg.inertia_seqs * prompt_seq_len(cfg) + cfg.predictor_eval + cfg.consistency_seqs * cfg.consistency_len)


def prompt_seq_len(cfg: AnalyzeConfig) -> int:
    """Length of the long-prompt inertia sequences: the prompt plus as many later tokens as
    the short run scores (0 when the long run is off)."""
    return cfg.prompt_n + cfg.inertia_len - cfg.first_n if cfg.prompt_n else 0


def calib_needed(cfg: AnalyzeConfig) -> int:
    """Calibration-split tokens the spans need."""
    return (cfg.histories - cfg.histories // 2) * cfg.history_len + cfg.predictor_tokens


def make_spans(cfg: AnalyzeConfig, eval_ids: torch.Tensor, calib_ids: torch.Tensor, vocab: int,
               bos: torch.Tensor, avoid: set[int] | None = None) -> Spans:
    """Cut every span from the two token streams; one-line error if a stream is too short."""
    need_e, need_c = eval_needed(cfg), calib_needed(cfg)
    if len(eval_ids) < need_e:
        raise MoyuError(f"eval text has {len(eval_ids)} tokens, the analysis needs {need_e} "
                        "(--tokens plus probes, inertia and predictor spans): pass a longer text "
                        "or smaller --tokens/--histories")
    if len(calib_ids) < need_c:
        raise MoyuError(f"calibration text has {len(calib_ids)} tokens, the analysis needs {need_c} "
                        "(histories and predictor fit): use fewer --histories")
    gen = torch.Generator().manual_seed(cfg.seed)
    pos = 0

    def take(src: torch.Tensor, n: int) -> torch.Tensor:
        nonlocal pos
        out = src[pos: pos + n]
        pos += n
        return out

    stream = take(eval_ids, cfg.tokens)
    probes = [take(eval_ids, cfg.probe_len) for _ in range(cfg.probes)]
    inat = [take(eval_ids, cfg.inertia_len) for _ in range(cfg.inertia_seqs)]
    plen = prompt_seq_len(cfg)
    pnat = [take(eval_ids, plen) for _ in range(cfg.inertia_seqs)] if plen else []
    pred_eval = take(eval_ids, cfg.predictor_eval)
    cons = [take(eval_ids, cfg.consistency_len) for _ in range(cfg.consistency_seqs)]
    pos = 0
    n_nat = cfg.histories - cfg.histories // 2
    nat_h = [take(calib_ids, cfg.history_len) for _ in range(n_nat)]
    pred_train = take(calib_ids, cfg.predictor_tokens)
    rnd_h = [random_ids(cfg.history_len, vocab, gen, avoid) for _ in range(cfg.histories // 2)]
    irnd = [random_ids(cfg.inertia_len, vocab, gen, avoid) for _ in range(cfg.inertia_seqs)]
    prnd = [random_ids(plen, vocab, gen, avoid) for _ in range(cfg.inertia_seqs)] if plen else []
    return Spans(stream, probes, nat_h, rnd_h, inat, irnd, pnat, prnd, pred_train, pred_eval, cons, bos)


def layers_of(model: nn.Module) -> list[MLPLayer]:
    """The model's MLP layers (unsupported architectures raise a one-line error)."""
    return mlp_layers(model)


def steady_allocator(threshold: int = 4 << 20) -> bool:
    """Fix glibc's mmap threshold so large freed tensors go back to the OS at once.

    glibc raises the threshold after each large free, after which streaming windows of
    activations are carved from a heap that fragments: measured here, the resident size of
    the over-activation stream grew 1.0 -> 1.6 GB over 6k tokens while the tensors held
    stayed flat. With the threshold fixed at 4 MB the peak stays at 0.96 GB and the run takes
    as long (at 128 kB every activation buffer pays page faults: 1.5x slower). Returns False
    where there is no glibc.
    """
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))   # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
