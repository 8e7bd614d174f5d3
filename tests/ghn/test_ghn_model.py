"""The GHN: exact parameter shapes, tiling and normalisation, learning, checkpoints, refused inputs."""
import math

import pytest
import torch
from torch import nn

from mnn_fast import io
from mnn_fast.ghn import (GHN, OP_TYPES, SPACES, ArchSpec, SampledCNN, assign_parameters, extract_graph, fit_tile,
                          load_ghn, meta_loss, predict_parameters, sample_architectures, save_ghn)
from mnn_fast.ghn.model import REPEAT_MIX
from mnn_fast.training.data import load_dataset
from mnn_fast.training.models import build_model


def small_ghn(seed=0, **kw):
    torch.manual_seed(seed)
    return GHN(**{"hidden": 16, "tile": (8, 8, 3, 3), "decoder_hidden": 32, "virtual_distance": 3, **kw})


def _sampled(space, seed):
    return SampledCNN(sample_architectures(SPACES[space], 1, seed, 8)[0], 1, 10)


@pytest.mark.parametrize("make,shape", [
    (lambda: build_model("mlp", 10, (1, 8, 8)), (1, 8, 8)),
    (lambda: build_model("small_cnn", 10, (1, 8, 8)), (1, 8, 8)),
    (lambda: build_model("resnet20", 10, (3, 32, 32)), (3, 32, 32)),
    (lambda: _sampled("in_distribution", 1), (1, 8, 8)),
    (lambda: _sampled("deeper", 2), (1, 8, 8)),
    (lambda: _sampled("wider", 3), (1, 8, 8)),
])
def test_predicts_every_parameter_with_its_exact_shape(make, shape):
    model = make()
    with torch.no_grad():
        params = predict_parameters(GHN(), model, shape)
    own = dict(model.named_parameters())
    assert sorted(params) == sorted(own)
    assert {k: tuple(v.shape) for k, v in params.items()} == {k: tuple(v.shape) for k, v in own.items()}
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in params.values())
    out = torch.func.functional_call(model.eval(), params, (torch.randn(2, *shape),))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_one_meta_batch_of_different_architectures_matches_one_at_a_time():
    ghn = small_ghn()
    models = [build_model("small_cnn", 10, (1, 8, 8)), _sampled("deeper", 5), build_model("mlp", 10, (1, 8, 8))]
    graphs = [extract_graph(m, (1, 8, 8)) for m in models]
    with torch.no_grad():
        together = ghn(graphs)
        alone = [ghn([g])[0] for g in graphs]
    for a, b in zip(together, alone):
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_backward_pass_carries_context_to_earlier_layers():
    # Two nets that differ only in their classifier: the first conv's prediction must differ too.
    ghn = small_ghn()
    g10, g5 = (extract_graph(build_model("small_cnn", c, (1, 8, 8)), (1, 8, 8)) for c in (10, 5))
    with torch.no_grad():
        w10, w5 = ghn([g10])[0]["0.weight"], ghn([g5])[0]["0.weight"]
    assert w10.shape == w5.shape and not torch.allclose(w10, w5)


def test_fit_tile_crops_mixes_repeats_and_resizes():
    tile = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).view(2, 3, 3, 3)
    w = fit_tile(tile, (5, 4, 1, 1))
    assert w.shape == (5, 4, 1, 1)
    centre = tile[:, :, 1, 1]
    assert torch.equal(w[:2, :3, 0, 0], centre)
    assert torch.equal(w[:2, 3, 0, 0], centre[:, 0])  # inputs repeat
    a = REPEAT_MIX  # block b: mostly the tile, partly the tile rolled by b inputs
    assert torch.allclose(w[2:4, :3, 0, 0], (1 - a * a) ** 0.5 * centre + a * torch.roll(centre, 1, dims=1))
    assert torch.allclose(w[4, :3, 0, 0], ((1 - a * a) ** 0.5 * centre + a * torch.roll(centre, 2, dims=1))[0])
    assert len({tuple(r.tolist()) for r in w[:, :, 0, 0]}) == 5  # no two output units are copies
    assert fit_tile(tile, (2, 3, 5, 5)).shape == (2, 3, 5, 5)
    assert torch.equal(fit_tile(tile, (2, 3, 3, 3)), tile)
    flat = fit_tile(tile, (2, 30))  # a linear weight reads the tile as [2, 3*3*3]
    assert torch.equal(flat[:, :27], tile.reshape(2, 27)) and torch.equal(flat[:, 27:], tile.reshape(2, 27)[:, :3])


def test_parameter_normalisation_and_batchnorm_start():
    ghn = GHN()
    model = build_model("resnet20", 10, (1, 8, 8))
    with torch.no_grad():
        params = predict_parameters(ghn, model, (1, 8, 8))
    for name, p in params.items():
        if p.dim() == 4:  # conv: He variance 2 / fan_in, within sampling noise of the untrained decoder
            ratio = p.std().item() / math.sqrt(2.0 / p[0].numel())
            assert 0.5 < ratio < 2.0, (name, ratio)
    bn = [k for k in params if ".bn" in k or k.startswith("bn")]
    assert bn and all(torch.equal(params[k], torch.ones_like(params[k]) if k.endswith("weight")
                                  else torch.zeros_like(params[k])) for k in bn)
    assert torch.equal(params["linear.bias"], torch.zeros(10))


def test_a_tiny_ghn_learns_on_a_fixed_batch():
    splits = load_dataset("digits", None, 0)
    x, y = splits.train_x[:64], splits.train_y[:64]
    specs = [ArchSpec((8,), (3,), (False,), (True,), True, "relu", 2, 0),
             ArchSpec((8, 8), (3, 3), (False, True), (False, False), False, "gelu", 2, 0)]
    nets = [(m, extract_graph(m, (1, 8, 8))) for m in (SampledCNN(s, 1, 10) for s in specs)]
    ghn = small_ghn()
    opt = torch.optim.Adam(ghn.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = meta_loss(ghn, nets, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.0  # about log(10): the untrained GHN predicts a random-like init
    assert losses[-1] < 0.5 * losses[0], losses[::5]


def test_gradients_reach_the_graph_network():
    ghn = small_ghn()
    net = build_model("small_cnn", 10, (1, 8, 8))
    meta_loss(ghn, [(net, extract_graph(net, (1, 8, 8)))], torch.randn(8, 1, 8, 8), torch.arange(8)).backward()
    for module in (ghn.gru, ghn.message, ghn.virtual_message, ghn.op_embedding, ghn.shape_encoder, ghn.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), module
    assert all(p.grad is None for p in net.parameters())  # the net's own parameters are not used


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    ghn = small_ghn(seed=3, rounds=2)
    with torch.no_grad():
        for p in ghn.parameters():  # non-zero heads, so every tensor matters
            p.add_(0.01 * torch.randn_like(p))
    g = extract_graph(build_model("resnet20", 10, (1, 8, 8)), (1, 8, 8))
    save_ghn(tmp_path / "ghn.safetensors", ghn, {"note": "test"})
    loaded, meta = load_ghn(tmp_path / "ghn.safetensors")
    assert loaded.hyperparameters() == ghn.hyperparameters()
    assert meta["note"] == "test"
    with torch.no_grad():
        a, b = ghn([g])[0], loaded([g])[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_foreign_or_tampered_checkpoints_are_refused(tmp_path):
    ghn = small_ghn()
    io.save_tensors(tmp_path / "plain.safetensors", ghn.state_dict())
    with pytest.raises(ValueError, match="not a GHN checkpoint"):
        load_ghn(tmp_path / "plain.safetensors")
    io.save_tensors(tmp_path / "bad.safetensors", ghn.state_dict(),
                    {"format": "mnn_fast.ghn/1", "hyperparameters": '{"hidden": "__import__(\'os\')"}'})
    with pytest.raises(ValueError, match="bad GHN hyperparameters"):
        load_ghn(tmp_path / "bad.safetensors")
    save_ghn(tmp_path / "ok.safetensors", GHN(hidden=8))
    tensors, meta = io.load_tensors(tmp_path / "ok.safetensors")
    io.save_tensors(tmp_path / "mismatch.safetensors", tensors, {**meta, "hyperparameters": meta["hyperparameters"]
                                                                  .replace('"hidden": 8', '"hidden": 16')})
    with pytest.raises(ValueError, match="does not match the architecture"):
        load_ghn(tmp_path / "mismatch.safetensors")
    with pytest.raises(ValueError, match="no such file"):
        load_ghn(tmp_path / "missing.safetensors")


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="hidden"):
        GHN(hidden=0)
    with pytest.raises(ValueError, match="tile"):
        GHN(tile=(8, 8, 3))
    with pytest.raises(TypeError, match="graphs"):
        small_ghn()([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="graphs"):
        small_ghn()(extract_graph(build_model("mlp", 10, (1, 8, 8)), (1, 8, 8)))
    net = build_model("mlp", 10, (1, 8, 8))
    with pytest.raises(ValueError, match="params"):
        assign_parameters(net, {"1.weight": torch.zeros(256, 64)})


def _reference_embed(ghn, g):
    """The gated propagation written node by node, in topological order and then in reverse."""
    feats = torch.tensor([n.shape_features() for n in g.nodes])
    h = list(ghn.op_embedding(torch.tensor([OP_TYPES.index(n.op) for n in g.nodes])) + ghn.shape_encoder(feats))
    dist = g.distances(ghn.virtual_distance)
    for _ in range(ghn.rounds):
        forward = (range(len(g)), lambda v: [(u, d) for (u, w), d in dist.items() if w == v])
        backward = (reversed(range(len(g))), lambda v: [(w, d) for (u, w), d in dist.items() if u == v])
        for order, incoming_of in (forward, backward):
            for v in order:
                incoming = incoming_of(v)
                m = sum((ghn.message(h[u]) if d == 1 else ghn.virtual_message(h[u]) / d for u, d in incoming),
                        torch.zeros(ghn.hidden)) / max(1, len(incoming))
                h[v] = ghn.gru(m[None], h[v][None])[0]
    return torch.stack(h)


@pytest.mark.parametrize("rounds", [1, 2])
def test_levelwise_propagation_equals_a_node_by_node_reference(rounds):
    ghn = small_ghn(rounds=rounds)
    graphs = [extract_graph(m, (1, 8, 8)) for m in (build_model("resnet20", 10, (1, 8, 8)), _sampled("deeper", 7))]
    with torch.no_grad():
        batched = ghn.embed(graphs)
        reference = torch.cat([_reference_embed(ghn, g) for g in graphs])
    assert batched.shape == reference.shape
    assert torch.allclose(batched, reference, atol=1e-5)
