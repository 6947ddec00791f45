"""The batch-1 decode loop: static KV cache, plain torch ops, pluggable MLP and linears."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MoyuError
from ..kernels import attn_decode, one_thread, rope_
from ..kernels.formats import WeightFormat, weight_format
from .convert import LeanLayer, FlatModel, flatten
from .steps import DenseLinear, LinearFactory, MLPFactory, dense_linear_factory, dense_mlp_factory


@dataclass
class Timings:
    """Wall-clock split of one :meth:`LeanModel.generate` call."""

    prefill_s: float
    decode_s: float
    prompt_tokens: int
    new_tokens: int

    @property
    def decode_tok_s(self) -> float:
        """Decode tokens per second (the first new token comes from prefill)."""
        return max(self.new_tokens - 1, 0) / max(self.decode_s, 1e-9)

    @property
    def tok_s(self) -> float:
        """New tokens per second, prefill included."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


# Below this many score elements (T * T * heads) prefill attention runs on one thread
# (see kernels._torch_impl.one_thread).
_ONE_THREAD_BELOW = 1 << 22


def _tensors(obj, depth: int = 0):
    """Tensors reachable from ``obj`` through lists and attributes (a few levels deep)."""
    if isinstance(obj, Tensor):
        yield obj
    elif depth > 3 or obj is None or isinstance(obj, (int, float, str, bool)):
        return
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for o in vars(obj).values():
            yield from _tensors(o, depth + 1)


class LeanModel:
    """A causal LM converted for fast batch-1 decoding on CPU.

    Build with :meth:`from_hf`; then :meth:`prefill` a prompt and :meth:`decode_step`
    token by token, or :meth:`generate`. The HF model may be deleted after conversion.
    """

    def __init__(self, flat: FlatModel, max_seq: int, fmt: WeightFormat):
        self.flat = flat
        self.fmt = fmt
        if flat.max_positions is not None:
            max_seq = min(max_seq, flat.max_positions)
        self.max_seq = max_seq
        s = flat
        self.qn, self.kn = s.n_heads * s.head_dim, s.n_kv * s.head_dim
        self.group = s.n_heads // s.n_kv
        shape = (len(s.layers), s.n_kv, max_seq, s.head_dim)
        self.k_cache = torch.zeros(shape)
        self.v_cache = torch.zeros(shape)
        # per-layer views and per-position RoPE rows, made once: indexing a tensor costs
        # ~1.5 us of dispatch, and decode would otherwise do it 4x per layer per token
        self._kv = list(zip(self.k_cache.unbind(0), self.v_cache.unbind(0)))
        self._rope_rows = [list(zip(c.unbind(0), s_.unbind(0))) for c, s_ in zip(flat.rope_cos, flat.rope_sin)]
        self.pos = 0
        self.fused = True
        self._plan = False   # built at the first decode step (False: not tried yet)
        self._logits: Tensor | None = None   # decode_step(reuse_logits=True)'s buffer
        self._fused_ends = False             # the plan also runs the embedding and the head
        self._h: Tensor | None = None
        self._unfused_reason: str | None = None
        self._prefilled = 0   # prompt positions of the last prefill (reusable by the next)
        self._last_ids = torch.empty(0, dtype=torch.long)

    @classmethod
    def from_hf(cls, model: nn.Module, mlp_factory: MLPFactory | None = None,
                linear_factory: LinearFactory | None = None, weights: "str | WeightFormat" = "fp32",
                max_seq: int = 2048) -> "LeanModel":
        """Convert an HF causal LM (fp32 weights on CPU).

        Args:
            model: a supported ``*ForCausalLM`` (see :mod:`moyu.arch`).
            mlp_factory: ``MLPLayer -> MLPStep``; default dense (kernels' dense path).
            linear_factory: ``(layer_index, role, weight [out, in], bias) -> step`` for the
                attention projections (roles ``q``, ``k``, ``v``, ``qkv``, ``o``). Without it the
                separate q/k/v are fused into one dense ``qkv``; GPT-NeoX's ``qkv`` rows are
                passed reordered to ``[q; k; v]``.
            weights: storage format of the weights (``fp32``, ``bf16``, a torch dtype or a
                :class:`~moyu.kernels.WeightFormat`); activations stay fp32.
            max_seq: KV cache length (prompt + new tokens).

        Batch 1 only. Peak memory during conversion is the HF model plus the packed copy;
        afterwards the runtime holds no reference to any HF module or parameter it did not
        take over as is (fp32 norms and embedding tables), so deleting the HF model frees
        its weights.
        """
        fmt = weight_format(weights)
        mlp_factory = mlp_factory or dense_mlp_factory(fmt)
        default = dense_linear_factory(fmt)
        with torch.inference_mode():
            flat = flatten(model, mlp_factory, linear_factory, default, max_seq)
            head = model.get_output_embeddings()
            tied = head.weight.data_ptr() == flat.embed.data_ptr()
            head_fmt = fmt.for_role("head")
            flat.lm_head = DenseLinear(head.weight, getattr(head, "bias", None), head_fmt, rowmajor=True)
            if tied:  # one table: the packed lm_head serves the embedding lookups too
                flat.embed = None
            elif fmt.quantized:   # an untied table in the head's format, rows widened per lookup
                flat.embed = DenseLinear(flat.embed, None, head_fmt)
            elif fmt.dtype != torch.float32:
                flat.embed = flat.embed.to(fmt.dtype)
        return cls(flat, max_seq, fmt)

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget the sequence (the cache is overwritten, not cleared)."""
        self.pos = self._prefilled = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the weights held (shared tensors counted once; KV cache excluded)."""
        s, seen = self.flat, {}
        objs = [s.embed, s.lm_head, s.final_norm, s.pos_table, s.project_in, s.project_out]
        for L in s.layers:
            objs += [*L.qkv, L.o, L.mlp, L.ln_attn, L.ln_mlp, L.ln_attn_out, L.ln_mlp_out,
                     L.q_norm, L.k_norm]
        for t in _tensors(objs):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return sum(seen.values())

    @property
    def cache_nbytes(self) -> int:
        """Bytes of the static KV cache."""
        return self.k_cache.nbytes + self.v_cache.nbytes

    @property
    def layers(self) -> list[LeanLayer]:
        """The decoder layers (attention and MLP steps, norms) in order."""
        return self.flat.layers

    def kept(self) -> list[int]:
        """Neurons each layer's MLP step computed at the last decode step."""
        return [L.mlp.kept for L in self.flat.layers]

    @property
    def plan(self):
        """The fused one-call-per-token decode loop (:mod:`moyu.runtime.fused`), or None where
        this model and format run per op (``fused_reason`` says why). Set ``fused = False``
        to decode per op anyway (the two give the same tokens; tested)."""
        if self._plan is False:
            from .fused import build_plan, ends_args, why_not
            self._unfused_reason = why_not(self.flat, self.fmt.quantized)
            self._plan = None if self._unfused_reason else build_plan(self.flat, self._kv)
            ends = None if self._plan is None else ends_args(self.flat)
            if ends is not None:   # the embedding lookup and the head run inside the same call
                self._plan.set_ends(*ends)
                self._h = torch.empty(self.flat.d)
            self._fused_ends = ends is not None
        return self._plan

    @property
    def fused_reason(self) -> str | None:
        """Why decoding runs per op rather than fused, or None when it runs fused."""
        if not self.fused:
            return "turned off (fused = False)"
        return None if self.plan is not None else self._unfused_reason

    # ----------------------------------------------------------------- pieces
    def _embed(self, ids: Tensor, pos0: int) -> Tensor:
        s = self.flat
        table = s.lm_head if s.embed is None else s.embed
        h = table.rows(ids) if isinstance(table, DenseLinear) else F.embedding(ids, table).float()
        if s.embed_scale != 1.0:
            h = h * s.embed_scale
        if s.project_in is not None:
            h = s.project_in(h)
        if s.pos_table is not None:
            p0 = pos0 + s.pos_offset
            h = h + s.pos_table[p0:p0 + ids.shape[0]]
        return h

    def _head(self, h: Tensor, out: Tensor | None = None) -> Tensor:
        s = self.flat
        if s.final_norm is not None:
            h = s.final_norm(h)
        if s.project_out is not None:
            h = s.project_out(h)
        return self._finish_logits(s.lm_head(h) if out is None else s.lm_head(h, out=out))

    def _finish_logits(self, logits: Tensor) -> Tensor:
        """The model's logit scale and final soft-cap, where it has them."""
        s = self.flat
        if s.logit_scale != 1.0:
            logits = logits * s.logit_scale
        if s.final_softcap:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return logits

    def _logits_buffer(self, reuse: bool) -> Tensor | None:
        """The kept logits buffer when ``reuse`` (made at first use), else None."""
        if not reuse:
            return None
        if self._logits is None:
            self._logits = torch.empty(self.flat.lm_head.out_features)
        return self._logits

    def _qkv(self, L: LeanLayer, x: Tensor) -> Tensor:
        if len(L.qkv) == 1:
            out = L.qkv[0](x)
        else:
            out = torch.cat([f(x) for f in L.qkv], dim=-1)
        if L.clip is not None:
            out = out.clamp(-L.clip, L.clip)
        return out

    def _split_rope(self, L: LeanLayer, qkv: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Prompt ``qkv [T, ...]`` from position ``start`` -> q ``[T, H, hd]``, k, v ``[T, Hkv, hd]``
        with q/k norms and RoPE applied (decode does this inside ``attn_decode``)."""
        s, qn, kn, T = self.flat, self.qn, self.kn, qkv.shape[0]
        q = qkv[:, :qn].view(T, s.n_heads, s.head_dim)
        k = qkv[:, qn:qn + kn].view(T, s.n_kv, s.head_dim)
        v = qkv[:, qn + kn:].view(T, s.n_kv, s.head_dim)
        if L.q_norm is not None:
            q, k = L.q_norm(q), L.k_norm(k)
        if L.rope >= 0:
            cos, sin = s.rope_cos[L.rope][start:start + T, None], s.rope_sin[L.rope][start:start + T, None]
            if L.q_norm is None:  # q and k are adjacent in qkv: rotate both at once
                rope_(qkv[:, :qn + kn].view(T, s.n_heads + s.n_kv, s.head_dim), cos, sin)
            else:
                rope_(q, cos, sin)
                rope_(k, cos, sin)
        return q, k, v

    def _attn_decode(self, li: int, L: LeanLayer, x: Tensor, pos: int) -> Tensor:
        s, qn, kn = self.flat, self.qn, self.kn
        qkv = self._qkv(L, x)
        q, k, v = qkv[:qn], qkv[qn:qn + kn], qkv[qn + kn:]
        if L.q_norm is not None:
            q = L.q_norm(q.view(s.n_heads, s.head_dim)).reshape(-1)
            k = L.k_norm(k.view(s.n_kv, s.head_dim)).reshape(-1)
        cos, sin = self._rope_rows[L.rope][pos] if L.rope >= 0 else (None, None)
        lo = max(0, pos - L.window + 1) if L.window else 0
        kc, vc = self._kv[li]
        out = attn_decode(q, k, v, kc, vc, pos, lo, cos, sin, L.scale, L.softcap or 0.0)
        return L.o(out)

    def _attn_prefill(self, li: int, L: LeanLayer, x: Tensor, start: int = 0) -> Tensor:
        """Prompt positions ``start .. start + T``; the cache already holds the ones before."""
        s, T = self.flat, x.shape[0]
        E = start + T
        q, k, v = self._split_rope(L, self._qkv(L, x), start)
        kc, vc = self.k_cache[li], self.v_cache[li]
        kc[:, start:E] = k.transpose(0, 1)
        vc[:, start:E] = v.transpose(0, 1)
        qh = (q * L.scale).view(T, s.n_kv, self.group, s.head_dim).permute(1, 2, 0, 3)
        with one_thread(T * E * s.n_heads < _ONE_THREAD_BELOW):
            scores = qh @ kc[:, None, :E].transpose(-1, -2)           # [Hkv, G, T, E]
            if L.softcap:
                scores = torch.tanh(scores / L.softcap) * L.softcap
            dist = torch.arange(start, E)[:, None] - torch.arange(E)[None, :]
            bad = dist < 0
            if L.window:
                bad |= dist >= L.window
            scores = scores.masked_fill(bad, float("-inf"))
            out = torch.softmax(scores, dim=-1) @ vc[:, None, :E]      # [Hkv, G, T, hd]
        return L.o(out.permute(2, 0, 1, 3).reshape(T, self.qn))

    def _layer(self, li: int, L: LeanLayer, h: Tensor, pos: int | None, start: int = 0) -> Tensor:
        """One decoder layer; ``pos`` None = prefill of ``h [T, d]`` from position ``start``."""
        s = self.flat
        decode = pos is not None
        if decode:
            mlp = L.mlp.decode
        elif start and hasattr(L.mlp, "prefill_from"):   # steps that keep prompt statistics
            mlp = lambda x: L.mlp.prefill_from(x, start)   # noqa: E731
        else:
            mlp = L.mlp.prefill
        x = h if s.post_ln else L.ln_attn(h)
        a = self._attn_decode(li, L, x, pos) if decode else self._attn_prefill(li, L, x, start)
        if L.ln_attn_out is not None:
            a = L.ln_attn_out(a)
        if s.parallel:
            return h + a + mlp(L.ln_mlp(h))
        if s.post_ln:
            h = L.ln_attn(h + a)
            return L.ln_mlp(h + mlp(h))
        h = h + a if s.residual_mult == 1.0 else h + a * s.residual_mult
        m = mlp(L.ln_mlp(h))
        if L.ln_mlp_out is not None:
            m = L.ln_mlp_out(m)
        return h + m if s.residual_mult == 1.0 else h + m * s.residual_mult

    def _check_room(self, n: int) -> None:
        if self.pos + n > self.max_seq:
            raise MoyuError(f"sequence of {self.pos + n} tokens exceeds the runtime's max_seq "
                            f"{self.max_seq}: rebuild with LeanModel.from_hf(..., max_seq=N)")

    def _prefill_hidden(self, ids: Tensor, reuse: int = 0) -> Tensor:
        ids = torch.as_tensor(ids).reshape(-1)
        if reuse and not self._steps_keep_prompts():
            raise MoyuError("prompt reuse needs enable_prompt_reuse() before the first prefill "
                            "(the method's steps did not keep the earlier prompt)")
        if not 0 <= reuse <= min(self._prefilled, ids.shape[0] - 1):
            raise MoyuError(f"cannot reuse {reuse} cached prompt positions: the last prefill "
                            f"cached {self._prefilled} and this prompt has {ids.shape[0]} tokens "
                            "(at least one must be new)")
        if reuse and not torch.equal(ids[:reuse], self._last_ids[:reuse]):
            raise MoyuError(f"cannot reuse {reuse} cached prompt positions: this prompt's first "
                            f"{reuse} tokens differ from the last prefill's (see reusable_prefix)")
        self.pos = 0
        self._check_room(ids.shape[0])
        self._prefilled = 0   # until this prefill is complete, nothing cached is reusable
        h = self._embed(ids[reuse:], reuse)
        for li, L in enumerate(self.flat.layers):
            h = self._layer(li, L, h, None, reuse)
        self.pos = self._prefilled = ids.shape[0]
        self._last_ids = ids.clone()
        return h

    # ----------------------------------------------------------------- public
    @torch.inference_mode()
    def prefill(self, ids: Tensor, reuse: int = 0) -> Tensor:
        """Run the prompt ``ids`` (``[T]`` or ``[1, T]``) from position 0; logits of its last position.

        ``reuse``: the first ``reuse`` tokens equal those of the previous prefill (checked;
        :meth:`reusable_prefix` finds the longest such prefix), so their cached keys and
        values, and the prompt statistics of sequence-level methods, are kept and only the
        rest is computed. Decoded positions are never reused:
        a method may have run sparse there, while a prompt is dense.
        """
        h = self._prefill_hidden(ids, reuse)
        return self._head(h[-1])

    def reusable_prefix(self, ids: Tensor) -> int:
        """How many leading tokens of ``ids`` :meth:`prefill` may take from the last prefill:
        the common prefix, at most ``len(ids) - 1``; 0 when a step cannot continue a prompt
        (a sequence method without :meth:`enable_prompt_reuse`) or after :meth:`reset`."""
        ids = torch.as_tensor(ids).reshape(-1)
        n = min(self._prefilled, ids.shape[0] - 1)
        if n <= 0 or not self._steps_keep_prompts():
            return 0
        diff = (ids[:n] != self._last_ids[:n]).nonzero()
        return int(diff[0, 0]) if diff.numel() else n

    def _steps_keep_prompts(self) -> bool:
        # steps without the flag keep no prompt state (see MLPStep)
        return all(getattr(L.mlp, "keep_prompt", True) for L in self.flat.layers)

    def enable_prompt_reuse(self) -> None:
        """Let steps that choose from the prompt keep its activations for :meth:`prefill`'s
        ``reuse`` (off by default: ``[T, d_ff]`` floats per layer)."""
        for L in self.flat.layers:
            if hasattr(L.mlp, "keep_prompt"):
                L.mlp.keep_prompt = True

    @torch.inference_mode()
    def decode_step(self, token_id: int | Tensor, reuse_logits: bool = False) -> Tensor:
        """Append one token at the current position; its next-token logits ``[vocab]``.

        ``reuse_logits``: write the logits into a buffer the runtime keeps and reuses at the
        next such call (for a caller that is done with them before then, like a sampling
        loop): a fresh ``[vocab]`` tensor per token costs ~0.1 ms of page faults here.
        """
        self._check_room(1)
        pos = self.pos
        plan = self.plan if self.fused else None
        if plan is not None and self._fused_ends:
            logits = self._logits_buffer(reuse_logits)
            if logits is None:
                logits = torch.empty(self.flat.lm_head.out_features)
            kept = plan.decode_token(int(token_id), pos, self._h, logits)
            for L, k in zip(self.flat.layers, kept.tolist()):
                L.mlp.count(k)
            self.pos = pos + 1
            return self._finish_logits(logits)
        h = self._embed(torch.as_tensor(token_id).reshape(1), pos)[0]
        if plan is not None:
            h = h.contiguous()
            for L, kept in zip(self.flat.layers, plan.step(h, pos).tolist()):
                L.mlp.count(kept)
        else:
            for li, L in enumerate(self.flat.layers):
                h = self._layer(li, L, h, pos)
        self.pos = pos + 1
        return self._head(h, self._logits_buffer(reuse_logits and isinstance(self.flat.lm_head, DenseLinear)))

    @torch.inference_mode()
    def logits(self, ids: Tensor, n_prefill: int = 1) -> Tensor:
        """Teacher-forced logits ``[T, vocab]``: prefill of the first ``n_prefill`` tokens, then
        one :meth:`decode_step` per token (what generation does, position by position)."""
        ids = torch.as_tensor(ids).reshape(-1)
        h = self._prefill_hidden(ids[:n_prefill])
        rows = [self._head(h)]
        rows += [self.decode_step(int(t))[None] for t in ids[n_prefill:]]
        return torch.cat(rows)

    @torch.inference_mode()
    def generate(self, ids: Tensor, max_new_tokens: int, greedy: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | list[int] | None = None) -> tuple[Tensor, Timings]:
        """Generate after the prompt ``ids``.

        Returns the new tokens ``[n]`` (int64) and :class:`Timings` (prefill / decode seconds).
        Stops early only at ``eos_token_id`` when given (the eos token is included).
        """
        ids = torch.as_tensor(ids).reshape(-1)
        self._check_room_total(ids.shape[0] + max_new_tokens - 1)
        gen = None if greedy else torch.Generator().manual_seed(seed if seed is not None else 0)
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        out: list[int] = []
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        t1 = time.perf_counter()
        for step in range(max_new_tokens):
            tok = self.pick(logits, greedy, temperature, top_p, gen)
            out.append(tok)
            if tok in eos or step == max_new_tokens - 1:
                break
            logits = self.decode_step(tok, reuse_logits=True)
        t2 = time.perf_counter()
        return torch.tensor(out, dtype=torch.long), Timings(t1 - t0, t2 - t1, ids.shape[0], len(out))

    def _check_room_total(self, n: int) -> None:
        if n > self.max_seq:
            raise MoyuError(f"prompt + new tokens = {n} exceeds the runtime's max_seq "
                            f"{self.max_seq}: rebuild with LeanModel.from_hf(..., max_seq=N)")

    @staticmethod
    def pick(logits: Tensor, greedy: bool, temperature: float, top_p: float,
             gen: torch.Generator | None) -> int:
        """The next token: argmax, or a draw with temperature and nucleus (top-p) filtering
        (what :meth:`generate` and the serving engine both use, so seeded draws agree)."""
        if greedy or temperature <= 0:
            if logits.dtype == torch.float32 and logits.dim() == 1:
                return int(np.argmax(logits.numpy()))   # 8x faster than torch.argmax here; same first-max rule
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            drop = (torch.cumsum(sp, 0) - sp) > top_p
            sp[drop] = 0.0
            return int(si[torch.multinomial(sp, 1, generator=gen)])
        return int(torch.multinomial(probs, 1, generator=gen))
