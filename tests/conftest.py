"""Shared fixtures: the real default model (loaded once), tiny random models of every
architecture, an isolated ``MOYU_CACHE`` and a tiny Llama GGUF written locally."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # keep transformers' progress bars out of the test output
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass


# Fixtures that load a real model: every test using one is in the slow tier by itself.
REAL_MODEL_FIXTURES = {"smollm", "default_run"}


def pytest_collection_modifyitems(items):
    """``-m "not slow"`` is the fast tier: tests on real models are marked slow here."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _tiny_tests_on_one_thread(request):
    """Fast-tier tests run torch on one thread: their tiny matmuls only lose to thread
    hand-offs (measured 10-30x slower on two threads of a busy machine). Slow-tier tests
    (real models) keep torch's default; tests that need threads set them themselves."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)`` of the default built-in model, from the real cache."""
    import moyu

    return moyu.load("smollm2-135m", verbose=False)


@pytest.fixture(scope="session")
def tiny():
    """``tiny(model_type)``: a memoised tiny random model of a supported architecture."""
    from moyu.tiny import tiny_model

    made: dict[str, object] = {}

    def get(model_type: str):
        if model_type not in made:
            made[model_type] = tiny_model(model_type)
        return made[model_type]

    return get


@pytest.fixture
def temp_cache(tmp_path, monkeypatch) -> Path:
    """An empty ``MOYU_CACHE`` for this test only (the real cache is never touched)."""
    root = tmp_path / "moyu-cache"
    monkeypatch.setenv("MOYU_CACHE", str(root))
    return root


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-to-printable-character table (the byte-level BPE alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path, d: int = 64, ff: int = 128, layers: int = 2, heads: int = 4,
                    kv: int = 2, seed: int = 0) -> Path:
    """A complete Llama GGUF (F32 tensors, byte-level BPE tokenizer) that transformers loads."""
    import gguf

    rng = np.random.default_rng(seed)
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens = ["<unk>", "<s>", "</s>"] + _bytes_to_unicode() + [m.replace(" ", "") for m in merges]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(d // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def rnd(*shape):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    hd = d // heads
    w.add_tensor("token_embd.weight", rnd(vocab, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("output.weight", rnd(vocab, d))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(p + "attn_q.weight", rnd(d, d))
        w.add_tensor(p + "attn_k.weight", rnd(kv * hd, d))
        w.add_tensor(p + "attn_v.weight", rnd(kv * hd, d))
        w.add_tensor(p + "attn_output.weight", rnd(d, d))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(p + "ffn_gate.weight", rnd(ff, d))
        w.add_tensor(p + "ffn_up.weight", rnd(ff, d))
        w.add_tensor(p + "ffn_down.weight", rnd(d, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """Path of a tiny Llama GGUF (about 0.4 MB) written once per session."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def cache_leftovers(root: Path) -> list[str]:
    """Temporary or partial files under a cache root (names starting with '.')."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def model_entries(root: Path) -> list[Path]:
    """Cache entries (one folder per dequantised GGUF) under a cache root."""
    d = root / "models"
    return sorted(d.iterdir()) if d.is_dir() else []


@pytest.fixture
def one_thread():
    """Run a test of tiny models on one thread: tiny matmuls only lose to thread hand-offs
    (30x slower when the machine is busy); restores the previous setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
