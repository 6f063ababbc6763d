"""Mixed precision under CUDA autocast's dtype rules, without a GPU: benchmarks.cuda_rules makes CPU
autocast run layer_norm, softmax, log_softmax and the losses in fp32 as CUDA does, and the
project's paths (fast path, reference loop, training, evaluation, generation) must still run
and agree, for tiny GPT-NeoX (LayerNorm) and Llama (RMSNorm) models in bf16 and fp16. Also the
CPU's bf16 modes (--precision bf16, bf16_head) within tolerance of fp32, and what auto chooses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_engines import _Tok, make_batches
from transformers import LlamaConfig, LlamaForCausalLM

import evaluate_memory
import train_guidance
from benchmarks.cuda_rules import imitate_cuda_autocast
from conftest import tiny_model
from docmem.chunked_ce import linear_cross_entropy
from docmem.config import TrainConfig
from docmem.engines import NO_MEMORY, FastEngine, ReferenceEngine
from docmem.trained_memory import load_memory_run
from document_memories import DocumentMemory, MemoryConfig
from fixtures_tiny import TINY_VOCAB, build_tiny_lm, build_tokenizer
from foundations import from_model
from foundations.placement import resolve_precision
from utils import final_norm, logit_lens

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# fast path against reference loop in half precision: both round the LM's activations, in
# different places (the reference's head runs under autocast, the fast path's chunked CE not)
HALF_RTOL = 2e-2


@pytest.fixture(params=sorted(HALF))
def half(request) -> torch.dtype:
    return HALF[request.param]


def test_imitation_follows_cuda_and_is_restored():
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    weight = torch.ones(8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.layer_norm(x, (8,), weight).dtype == torch.bfloat16  # CPU's rule
    with imitate_cuda_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.nn.functional.layer_norm(x, (8,), weight).dtype == torch.float32
            assert torch.nn.LayerNorm(8).to(torch.bfloat16)(x).dtype == torch.float32
            assert x.softmax(-1).dtype == torch.float32 and torch.log_softmax(x, -1).dtype == torch.float32
            assert torch.nn.functional.softmax(x, -1).dtype == torch.float32
        # outside autocast the ops keep their dtype
        assert torch.nn.functional.layer_norm(x, (8,), weight).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert x.softmax(-1).dtype == torch.bfloat16  # restored


def _setup(arch: str, dtype: torch.dtype):
    model = tiny_model(arch, num_layers=4).to(dtype)
    foundation = from_model(model, _Tok())
    memory = DocumentMemory(MemoryConfig(hidden_size=32, num_docs=3, memory_dim=8),
                            generator=torch.Generator().manual_seed(1))
    return foundation, memory


def test_fast_equals_reference_under_cuda_rules(arch, half):
    """The failing case before the fix: GPT-NeoX's final LayerNorm returns fp32 under CUDA
    autocast, and the fast path's head product met a half-precision weight."""
    foundation, memory = _setup(arch, half)
    batches = make_batches(True, n_docs=2)
    with imitate_cuda_autocast():
        for layer in (1, 3):
            ref, fast = ReferenceEngine(foundation, memory, layer, half), FastEngine(foundation, memory, layer, half)
            for batch in batches[: 2 if layer == 1 else 1]:
                sets = [memory.keys_for(batch.doc_ids), memory.keys_for((batch.doc_ids + 1) % 2), None, NO_MEMORY]
                r = ref.losses(batch, sets)
                f = fast.losses(batch, sets)
                (fast.losses(batch, sets[:1])[0]).backward()  # the gradient reaches the memory
                for a, b in zip(r, f):
                    assert a.dtype == b.dtype == torch.float32
                    torch.testing.assert_close(b, a, rtol=HALF_RTOL, atol=0)
            # the prefix cache (and a pinned-memory spill, a copy of it) holds the LM's dtype
            assert fast.cache and all(t.dtype == half for t in fast.cache.values())
    grad = memory.up.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all()


# ---- training, evaluation and generation end to end, on tiny saved models --------------------

def _build_tiny_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    return {"gpt_neox": build_tiny_lm(tmp_path_factory.mktemp("neox")),
            "llama": _build_tiny_llama(tmp_path_factory.mktemp("llama"))}


TRAIN = ["--num_gpus", "0", "--dataset", "synthetic", "--synthetic_articles", "6", "--max_labels", "2",
         "--max_segments", "2", "--segment_length", "16", "--max_length", "32", "--hook_memory_layer", "1",
         "--hook_memory_dim", "8", "--num_epochs", "2", "--save_freq", "2", "--lr", "1e-2"]


@pytest.mark.parametrize("precision", sorted(HALF))
def test_train_evaluate_generate_under_cuda_rules(arch, precision, tiny_dirs, tmp_path, capsys):
    with imitate_cuda_autocast():
        assert train_guidance.main(["--lm_path", str(tiny_dirs[arch]), *TRAIN, "--precision", precision,
                                    "--save_dir", str(tmp_path)]) == 0
        run = tmp_path / "run_0"
        assert yaml.safe_load((run / "config.yaml").read_text())["resolved"]["dtype"] == str(HALF[precision]).removeprefix("torch.")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["ce_positive"])) for m in metrics)
        assert evaluate_memory.main(["--run_dir", str(run), "--prompt_tokens", "4", "--new_tokens", "4",
                                     "--grid", "0", "--max_other_keys", "1"]) == 0
        ce = json.loads((run / "eval" / "ce_matrix.json").read_text())
        assert all(0 < v < 50 for row in ce["matrix"] for v in row)
        memory = load_memory_run(run, device="cpu")
        assert memory.dtype == HALF[precision]
        assert isinstance(memory.select(0).generate(max_new_tokens=3), str)
        assert isinstance(memory.no_key().generate("The", max_new_tokens=3), str)
    capsys.readouterr()


class _Decoder(_Tok):
    def decode(self, ids: list[int]) -> str:
        return str(ids)


def test_logit_lens_under_cuda_rules(arch, half):
    foundation, memory = _setup(arch, half)
    decoder = foundation.decoder()
    with imitate_cuda_autocast(), torch.autocast("cpu", dtype=half):
        top = logit_lens(memory.readout(memory.doc_keys[:2]), final_norm(decoder),
                         foundation.model.get_output_embeddings(), _Decoder(), top_k=3)
    assert len(top) == 2 and all(len(row) == 3 for row in top)


# ---- bf16 on the CPU: --precision bf16 and bf16_head (fp32 LM, bf16 head products) ----------

@pytest.mark.parametrize("lm_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "bf16_head"])
def test_bf16_fast_path_within_tolerance_of_fp32_reference(arch, lm_dtype):
    """Plain CPU autocast (no imitation): the fast path in bf16, or with only the head's products in
    bf16, against the fp32 reference loop, losses and the memory's gradient."""
    foundation32, memory = _setup(arch, torch.float32)
    foundation = from_model(tiny_model(arch, num_layers=4).to(lm_dtype), _Tok())
    batch = make_batches(True, n_docs=1)[0]
    sets = [memory.keys_for(batch.doc_ids), memory.keys_for((batch.doc_ids + 1) % 3)]
    grads = []
    for engine in (ReferenceEngine(foundation32, memory, 2, torch.float32),
                   FastEngine(foundation, memory, 2, lm_dtype, head_dtype=torch.bfloat16)):
        memory.zero_grad()
        losses = engine.losses(batch, sets)
        (losses[0] + 0.5 * losses[1]).backward()
        grads.append((torch.stack(losses).detach(), memory.up.weight.grad.clone()))
    (ref, ref_grad), (fast, fast_grad) = grads
    torch.testing.assert_close(fast, ref, rtol=HALF_RTOL if lm_dtype == torch.bfloat16 else 5e-3, atol=0)
    assert ((fast_grad - ref_grad).norm() / ref_grad.norm()).item() < (0.1 if lm_dtype == torch.bfloat16 else 0.03)


def test_chunked_ce_with_a_bf16_head_copy():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight, targets = torch.randn(50, 16), torch.randint(0, 50, (37,))
    ours = linear_cross_entropy(hidden, weight.bfloat16(), targets, chunk_size=8)
    (g1,) = torch.autograd.grad(ours.sum(), hidden)
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none")
    (g2,) = torch.autograd.grad(plain.sum(), hidden)
    assert ours.dtype == g1.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=2e-2, atol=2e-2)
    assert ((g1 - g2).norm() / g2.norm()).item() < 2e-2


@pytest.mark.parametrize("units", [(), ("AMX",), ("AVX512-BF16",)])
def test_precision_auto_follows_the_cpu(monkeypatch, units):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: "AMX" in units)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: "AVX512-BF16" in units)
    auto = resolve_precision(TrainConfig(lm_path="unused"), "cpu")
    assert auto.lm == torch.float32  # the LM stays fp32 on any CPU
    if units:
        assert auto.name == "bf16_head" and auto.head == torch.bfloat16 and units[0] in auto.reason
    else:
        assert auto.name == "fp32" and auto.head == torch.float32 and "without native bf16" in auto.reason
    assert resolve_precision(TrainConfig(lm_path="unused"), "cuda:0").name == "bf16"
    asked = resolve_precision(TrainConfig(lm_path="unused", precision="fp32"), "cpu")
    assert asked.record() == {"precision": "fp32", "dtype": "float32", "head_dtype": "float32",
                              "precision_reason": "asked for"}
