"""The document memory: shapes, keys, activations, variants, save/load."""
from __future__ import annotations

import json

import pytest
import torch

from document_memories import DocumentMemory, MemoryConfig, MemoryFileError, load_memory


def make(**kw) -> DocumentMemory:
    cfg = dict(hidden_size=16, num_docs=5, memory_dim=8, key_dim=2)
    cfg.update(kw)
    return DocumentMemory(MemoryConfig(**cfg), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid", "swiglu", "gelu", "silu"])
@pytest.mark.parametrize("module_type", ["linear", "nonlinear"])
def test_forward_shapes_and_key_dependence(act, module_type):
    mem = make(key_activation=act, module_type=module_type, key_internal_layers=3)
    x = torch.randn(3, 7, 16)
    keys = mem.keys_for([0, 1, 2])
    y = mem(x, keys)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mem.selection(keys).shape == (3, 8)
    # a different key changes the output of that row only
    y2 = mem(x, mem.keys_for([0, 1, 4]))
    assert torch.equal(y[:2], y2[:2])
    assert not torch.allclose(y[2], y2[2])
    # no key: the memory is applied without selection, and differs from keyed output
    y0 = mem(x, None)
    assert y0.shape == x.shape and not torch.allclose(y0, y)


def test_formula_linear_tanh():
    mem = make()
    x = torch.randn(2, 4, 16)
    k = mem.keys_for([3, 1])
    a = torch.nn.functional.gelu(mem.up(x))
    s = torch.tanh(mem.gate(k))
    expected = x + torch.nn.functional.gelu(mem.out(mem.down(a * s[:, None, :])))
    torch.testing.assert_close(mem(x, k), expected)


def test_swiglu_gate_has_2m_outputs():
    mem = make(key_activation="swiglu")
    assert mem.gate.out_features == 16
    k = mem.keys_for([0])
    g = mem.gate(k)
    torch.testing.assert_close(mem.selection(k), g[:, :8] * torch.nn.functional.silu(g[:, 8:]))  # released split


def test_nonlinear_depth():
    for layers in (2, 3, 4):  # the released make_mlp: L + 1 linear layers (tests/test_fidelity.py: all of it)
        mem = make(module_type="nonlinear", key_internal_layers=layers, key_internal_dim=12)
        linears = [m for m in mem.gate if isinstance(m, torch.nn.Linear)]
        assert len(linears) == layers + 1 and linears[0].in_features == 2 and linears[-1].out_features == 8


def test_keys_fixed_by_default_and_learnable_on_request():
    fixed, learn = make(), make(learn_doc_keys=True)
    assert not fixed.doc_keys.requires_grad and fixed.doc_keys not in set(fixed.trainable_parameters())
    assert learn.doc_keys.requires_grad and any(p is learn.doc_keys for p in learn.trainable_parameters())
    # orthogonal init with gain sqrt(2): columns orthogonal with squared norm 2
    gram = fixed.doc_keys.T @ fixed.doc_keys
    torch.testing.assert_close(gram, 2 * torch.eye(2), atol=1e-5, rtol=0)


def test_seeded_init_is_reproducible_and_leaves_global_rng():
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = make()
    after = torch.rand(1)
    b = make()
    assert torch.equal(before, after)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_batch_expansion_for_generate():
    mem = make()
    x = torch.randn(4, 3, 16)
    k = mem.keys_for([1, 2])
    y = mem(x, k)
    torch.testing.assert_close(y[1], mem(x[1:2], k[:1])[0])
    torch.testing.assert_close(y[2], mem(x[2:3], k[1:])[0])
    with pytest.raises(ValueError):
        mem(torch.randn(3, 3, 16), k)


@pytest.mark.parametrize("kw", [{}, {"module_type": "nonlinear", "key_activation": "relu"}, {"learn_doc_keys": True}])
def test_save_load_round_trip(tmp_path, kw):
    mem = make(**kw)
    with torch.no_grad():
        for p in mem.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mem.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["memory.safetensors", "memory_config.json"]
    loaded = load_memory(tmp_path / "m")
    x = torch.randn(2, 5, 16)
    k = mem.keys_for([0, 4])
    assert torch.equal(mem(x, k), loaded(x, loaded.keys_for([0, 4])))
    assert loaded.doc_keys.requires_grad == mem.doc_keys.requires_grad


def test_load_errors_name_the_file(tmp_path):
    mem = make()
    mem.save(tmp_path / "m")
    with pytest.raises(MemoryFileError, match="hidden_size 16 does not match"):
        load_memory(tmp_path / "m", expect_hidden_size=32)
    with pytest.raises(MemoryFileError, match="num_docs"):
        load_memory(tmp_path / "m", expect_num_docs=6)
    weights = tmp_path / "m" / "memory.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(MemoryFileError, match="memory.safetensors"):
        load_memory(tmp_path / "m")
    cfg = tmp_path / "m" / "memory_config.json"
    cfg.write_text(json.dumps({"hidden_size": 16, "num_docs": 5, "bogus": 1}))
    with pytest.raises(MemoryFileError, match="memory_config.json"):
        load_memory(tmp_path / "m")


def test_config_validation():
    with pytest.raises(ValueError, match="module_type"):
        MemoryConfig(hidden_size=4, num_docs=2, module_type="deep")
    with pytest.raises(ValueError, match="unknown activation"):
        MemoryConfig(hidden_size=4, num_docs=2, key_activation="wiggle")
    with pytest.raises(ValueError, match="memory_dim"):
        MemoryConfig(hidden_size=4, num_docs=2, memory_dim=0)
