"""Conditioner networks: MADE (autoregressive masks, sequential inversion), MLP, MaskedLinear, CNN, ClassEmbedding."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb
from torch import nn

from pyro_flows.nn import CNN, MADE, MLP, ClassEmbedding, MaskedLinear

D, C = 5, 3


def draw(shape, dtype=torch.float64, seed=0, std=1.0):
    generator = torch.Generator().manual_seed(seed)
    return std * torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def random_order(d, seed):
    return torch.randperm(d, generator=torch.Generator().manual_seed(seed))


def made(features=D, params=2, hidden=(16, 16), context=0, order=None, activation=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    net = MADE(features, params, hidden, context, order, activation)
    return perturb(net, scale=0.5, seed=seed + 1).double()


# -- MADE: the autoregressive property --------------------------------------------------------------------------------
MADE_CONFIGS = [
    pytest.param(D, 1, (16, 16), 0, id="D5-P1"),
    pytest.param(D, 3, (16, 16), 0, id="D5-P3"),
    pytest.param(D, 2, (16, 16), C, id="D5-P2-context"),
    pytest.param(D, 2, (7, 3, 9), 0, id="D5-P2-narrow"),
    pytest.param(D, 2, (3,), C, id="D5-P2-narrow-context"),
    pytest.param(1, 2, (4,), 0, id="D1"),
    pytest.param(1, 2, (4,), C, id="D1-context"),
]


@pytest.mark.parametrize("features, params, hidden, context", MADE_CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh], ids=["relu", "tanh"])
def test_made_is_autoregressive(features, params, hidden, context, seed, activation):
    order = random_order(features, seed)
    net = made(features, params, hidden, context, order, activation, seed)
    x = draw((features,), seed=seed + 10, std=2.0)
    ctx = draw((context,), seed=seed + 20) if context else None
    out = net(x, ctx)
    assert out.shape == (params, features)

    jac = torch.autograd.functional.jacobian(lambda v: net(v, ctx), x)  # (P, D, D_in)
    allowed = order[None, :] < order[:, None]  # [i, j]: output variable i may depend on input j
    forbidden = ~allowed
    assert (jac[:, forbidden] == 0).all(), "an output depends on an input at or after it in the order"
    if activation is nn.Tanh and min(hidden) >= features - 1:  # wide enough to realise every allowed connection
        assert (jac.abs().amax(0)[allowed] > 0).all(), "an allowed dependency is missing"
    # the variable first in the order depends on nothing but the context
    first = int(torch.argmin(order))
    assert (jac[:, first] == 0).all()

    if context:
        jac_ctx = torch.autograd.functional.jacobian(lambda c: net(x, c), ctx)  # (P, D, C)
        if activation is nn.Tanh:
            assert (jac_ctx.abs().amax(dim=(0, 2)) > 0).all(), "the context must reach every output"
        assert (jac_ctx.abs() > 0).any()


@pytest.mark.parametrize("features, params, hidden, context", MADE_CONFIGS)
def test_made_mask_connectivity(features, params, hidden, context):
    """The product of the masks connects output i to input j exactly when order[j] < order[i] (wide enough nets)."""
    order = random_order(features, 3)
    net = MADE(features, params, hidden, context, order)
    path = net.hidden[0].mask[:, :features].double()
    for layer in list(net.hidden[1:]) + [net.output]:
        path = layer.mask.double() @ path
    path = path.unflatten(0, (params, features)) > 0  # (P, D, D_in)
    allowed = order[None, :] < order[:, None]
    assert not (path & ~allowed).any()
    if min(hidden) >= features - 1:
        assert (path == allowed).all()
    if context:  # every first-layer unit sees the whole context
        assert (net.hidden[0].mask[:, features:] == 1).all()


def test_made_output_layer_starts_at_zero():
    net = MADE(D, 3, (16, 16), C)
    out = net(draw((4, D), torch.float32), draw((4, C), torch.float32))
    assert out.shape == (4, 3, D)
    assert torch.equal(out, torch.zeros_like(out))


def test_made_rejects_bad_arguments():
    with pytest.raises(ValueError):
        MADE(3, 1, (8,), order=[0, 0, 1])
    with pytest.raises(ValueError):
        MADE(3, 1, ())
    with pytest.raises(ValueError):
        MADE(0, 1, (8,))


# -- MADE.sequential --------------------------------------------------------------------------------------------------
def affine_forward(net, x, ctx):
    """y = x * exp(tanh(s(x))) + t(x), s and t from the MADE (parameter-major output: (..., 2, D))."""
    params = net(x, ctx)
    shift, log_scale = params[..., 0, :], torch.tanh(params[..., 1, :])
    return x * log_scale.exp() + shift


def affine_inverse_step(y_i, params):
    return (y_i - params[..., 0]) * torch.exp(-torch.tanh(params[..., 1]))


@pytest.mark.parametrize("hidden", [(16, 16), (7, 3, 9), (3,)], ids=str)
@pytest.mark.parametrize("context", [0, C], ids=["no-context", "context"])
@pytest.mark.parametrize("batch", [(), (4,), (2, 3)], ids=str)
def test_made_sequential_inverts_an_autoregressive_affine_map(hidden, context, batch):
    order = random_order(D, 5)
    net = made(D, 2, hidden, context, order, seed=7)
    x_true = draw(batch + (D,), seed=8, std=2.0)
    ctx = draw(batch + (context,), seed=9) if context else None
    y = affine_forward(net, x_true, ctx)
    assert (y - x_true).abs().max() > 0.1

    calls = []

    def solve(i, params):
        assert params.shape == batch + (2,)
        calls.append(i)
        return affine_inverse_step(y[..., i], params)

    x = net.sequential(solve, torch.Size(batch), ctx)
    assert x.shape == batch + (D,)
    torch.testing.assert_close(x, x_true, rtol=0, atol=1e-12)
    assert calls == torch.argsort(order).tolist(), "variables must be solved in the MADE's order"


@pytest.mark.parametrize("context", [0, C], ids=["no-context", "context"])
def test_made_sequential_gradients_match_the_implicit_derivative(context):
    """Gradients through ``sequential`` equal those through D fixed-point sweeps of the full network.

    The sweep x <- g(y, MADE(x)) has a strictly triangular Jacobian in x, so D sweeps from any start reach the exact
    inverse *and* its exact derivative w.r.t. the parameters: an independent reference for the sequential path (which
    reads raw weight slices instead of the masked layers).
    """
    order = random_order(D, 11)
    net = made(D, 2, (16, 16), context, order, seed=12)
    batch = (6,)
    y = draw(batch + (D,), seed=13, std=2.0)
    ctx = draw(batch + (context,), seed=14).requires_grad_(True) if context else None

    def solve(i, params):
        return affine_inverse_step(y[..., i], params)

    x_seq = net.sequential(solve, torch.Size(batch), ctx)
    inputs = list(net.parameters()) + ([ctx] if context else [])
    weights = draw(batch + (D,), seed=19)
    grads_seq = torch.autograd.grad((x_seq**2 * weights).sum(), inputs)

    x = torch.zeros_like(y)
    for _ in range(D):
        params = net(x, ctx)
        x = affine_inverse_step(y, params.movedim(-2, -1))
    torch.testing.assert_close(x_seq, x, rtol=0, atol=1e-12)
    grads_ref = torch.autograd.grad((x**2 * weights).sum(), inputs)
    names = [name for name, _ in net.named_parameters()] + (["context"] if context else [])
    for name, g_seq, g_ref in zip(names, grads_seq, grads_ref, strict=True):
        torch.testing.assert_close(g_seq, g_ref, rtol=0, atol=1e-10, msg=name)
    assert any(g.abs().max() > 0 for g in grads_seq)


def test_made_sequential_with_context_broadcast_in_batch():
    """A context (C,) shared by a batch of values."""
    net = made(D, 2, (16, 16), C, random_order(D, 15), seed=16)
    x_true = draw((4, D), seed=17)
    ctx = draw((C,), seed=18)
    y = affine_forward(net, x_true, ctx)

    def solve(i, params):
        return affine_inverse_step(y[..., i], params)

    x = net.sequential(solve, torch.Size((4,)), ctx.expand(4, C))
    torch.testing.assert_close(x, x_true, rtol=0, atol=1e-12)


# -- MLP --------------------------------------------------------------------------------------------------------------
def manual_mlp(net: MLP, h: torch.Tensor) -> torch.Tensor:
    for i, layer in enumerate(net.hidden):
        z = torch.relu(h @ layer.weight.T + layer.bias)
        h = h + z if net.residual and i > 0 and z.shape[-1] == h.shape[-1] else z
    return h @ net.output.weight.T + net.output.bias


def test_mlp_shapes_and_values():
    torch.manual_seed(0)
    net = perturb(MLP(3, 8, hidden=(16, 16)), seed=1)
    for shape in [(3,), (5, 3), (2, 5, 3)]:
        x = draw(shape, torch.float32, seed=2)
        out = net(x)
        assert out.shape == shape[:-1] + (8,)
        torch.testing.assert_close(out, manual_mlp(net, x), rtol=1e-5, atol=1e-6)


def test_mlp_context_broadcasting():
    torch.manual_seed(0)
    net = perturb(MLP(3, 8, hidden=(16, 16), context_features=2), seed=1).double()
    k, n = 4, 5

    def ref(x, c):
        batch = torch.broadcast_shapes(x.shape[:-1], c.shape[:-1])
        return manual_mlp(net, torch.cat((x.expand(batch + (3,)), c.expand(batch + (2,))), dim=-1))

    cases = [
        (draw((k, n, 3), seed=2), draw((n, 2), seed=3), (k, n, 8)),
        (draw((3,), seed=4), draw((n, 2), seed=5), (n, 8)),
        (draw((n, 3), seed=6), draw((2,), seed=7), (n, 8)),
        (draw((n, 3), seed=8), draw((n, 2), seed=9), (n, 8)),
    ]
    for x, c, shape in cases:
        out = net(x, c)
        assert out.shape == shape
        torch.testing.assert_close(out, ref(x, c), rtol=0, atol=1e-12)
    # the context is used
    x = draw((3,), seed=10)
    assert (net(x, draw((2,), seed=11)) - net(x, draw((2,), seed=12))).abs().max() > 1e-6


def test_mlp_zero_init():
    x = draw((6, 3), torch.float32)
    out = MLP(3, 4, hidden=(16, 16), context_features=2)(x, draw((6, 2), torch.float32))
    assert torch.equal(out, torch.zeros(6, 4))
    torch.manual_seed(0)
    out = MLP(3, 4, hidden=(16, 16), zero_init=False)(x)
    assert out.abs().max() > 0


@pytest.mark.parametrize("hidden", [(8, 8, 8), (8, 6, 6)], ids=str)
def test_mlp_residual(hidden):
    torch.manual_seed(0)
    net = perturb(MLP(3, 4, hidden=hidden, residual=True), seed=1).double()
    x = draw((7, 3), seed=2)
    torch.testing.assert_close(net(x), manual_mlp(net, x), rtol=0, atol=1e-12)
    plain = copy.deepcopy(net)
    plain.residual = False
    assert (net(x) - plain(x)).abs().max() > 1e-6  # the skip connections do something


# -- MaskedLinear -----------------------------------------------------------------------------------------------------
def masked_layer(seed=0):
    torch.manual_seed(seed)
    mask = torch.rand(6, 4) > 0.4
    return MaskedLinear(mask), mask


def test_masked_linear_grad_and_no_grad_paths_agree():
    layer, mask = masked_layer()
    x = draw((5, 4), torch.float32, seed=1)
    expected = x @ (layer.weight * mask).T + layer.bias
    out = layer(x)
    assert out.requires_grad
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), out.detach(), rtol=0, atol=0)
    # masked entries get no gradient, unmasked ones do
    out.sum().backward()
    assert (layer.weight.grad[~mask] == 0).all()
    assert (layer.weight.grad[mask] != 0).all()


def _expected(layer, mask, x):
    return F.linear(x, layer.weight.detach() * mask, layer.bias.detach())


@pytest.mark.parametrize(
    "update",
    [
        "inplace_no_grad",
        "optimizer_step",
        "load_state_dict",
        "assign_data",
        "data_inplace",
    ],
)
def test_masked_linear_no_grad_cache_refreshes_after_weight_change(update):
    layer, mask = masked_layer()
    x = draw((5, 4), torch.float32, seed=2)
    with torch.no_grad():
        before = layer(x)  # fills the cache
    if update == "inplace_no_grad":
        with torch.no_grad():
            layer.weight.mul_(2.0)
    elif update == "optimizer_step":
        layer(x).pow(2).sum().backward()
        torch.optim.SGD(layer.parameters(), lr=0.5).step()
    elif update == "load_state_dict":
        other, _ = masked_layer(seed=1)
        other.mask.copy_(layer.mask)
        layer.load_state_dict(other.state_dict())
    elif update == "assign_data":
        layer.weight.data = layer.weight.data * 2.0
    else:  # the classic hand-written update: p.data.add_(...) does not bump p._version
        layer.weight.data.mul_(2.0)
    with torch.no_grad():
        after = layer(x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, _expected(layer, mask, x), rtol=0, atol=1e-6)


def test_masked_linear_frozen_weight_under_autograd():
    """requires_grad=False takes the cached path even with autograd on; it must still follow weight changes."""
    layer, mask = masked_layer()
    layer.weight.requires_grad_(False)
    x = draw((5, 4), torch.float32, seed=3)
    before = layer(x)
    with torch.no_grad():
        layer.weight.add_(1.0)
    after = layer(x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, _expected(layer, mask, x), rtol=0, atol=1e-6)


def test_masked_linear_dtype_copy_and_pickle():
    layer, mask = masked_layer()
    x = draw((5, 4), torch.float32, seed=4)
    with torch.no_grad():
        layer(x)  # cache filled
        layer64 = copy.deepcopy(layer).double()
        out64 = layer64(x.double())
        assert out64.dtype == torch.float64 and layer64.mask.dtype == torch.float64
        torch.testing.assert_close(out64, _expected(layer64, mask, x.double()), rtol=0, atol=1e-12)
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
            clone.weight.mul_(3.0)
            torch.testing.assert_close(clone(x), _expected(clone, mask, x), rtol=0, atol=1e-6)
            torch.testing.assert_close(layer(x), _expected(layer, mask, x), rtol=0, atol=1e-6)


# -- CNN --------------------------------------------------------------------------------------------------------------
def manual_cnn(net: CNN, x: torch.Tensor, context=None) -> torch.Tensor:
    """Glow's coupling network written out with F.conv2d on (N, C, H, W): 3x3, 1x1..., 3x3; context as a bias."""
    h = x
    for i, layer in enumerate(net.hidden):
        k = layer.kernel_size[0]
        h = F.conv2d(h, layer.weight, layer.bias, padding=k // 2)
        if i == 0 and context is not None:
            h = h + (context @ net.context_bias.weight.T + net.context_bias.bias)[:, :, None, None]
        h = torch.relu(h)
    return F.conv2d(h, net.output.weight, net.output.bias, padding=1)


def cnn(context=0, hidden=(8, 6), seed=0):
    torch.manual_seed(seed)
    return perturb(CNN(2, 4, hidden=hidden, context_features=context), scale=0.3, seed=seed + 1).double()


@pytest.mark.parametrize("hidden", [(8,), (8, 6), (8, 6, 5)], ids=str)
def test_cnn_values_and_shapes(hidden):
    net = cnn(hidden=hidden)
    assert [layer.kernel_size for layer in net.hidden] == [(3, 3)] + [(1, 1)] * (len(hidden) - 1)
    x = draw((3, 2, 5, 6), seed=2)
    torch.testing.assert_close(net(x), manual_cnn(net, x), rtol=0, atol=1e-12)
    for batch in [(), (4,), (2, 3)]:
        xb = draw(batch + (2, 5, 6), seed=3)
        out = net(xb)
        assert out.shape == batch + (4, 5, 6)
        torch.testing.assert_close(out, net(xb.reshape(-1, 2, 5, 6)).reshape(out.shape), rtol=0, atol=1e-12)


def test_cnn_receptive_field_is_five_by_five():
    """Two 3x3 convolutions (the 1x1s add nothing): an output pixel depends on inputs at most 2 pixels away."""
    net = cnn()
    x = draw((2, 7, 7), seed=4)
    jac = torch.autograd.functional.jacobian(net, x)  # (4, 7, 7, 2, 7, 7)
    rows = torch.arange(7)
    distance = torch.maximum(
        (rows[:, None, None, None] - rows[None, None, :, None]).abs(),
        (rows[None, :, None, None] - rows[None, None, None, :]).abs(),
    )  # (h, w, h', w') Chebyshev distance
    dependence = jac.abs().sum(dim=(0, 3)) > 0  # (h, w, h', w')
    assert not dependence[distance > 2].any()
    assert dependence[distance <= 2].float().mean() > 0.9  # (ReLUs may switch off a few paths)


def test_cnn_context_is_a_bias_of_the_first_hidden_layer_and_broadcasts():
    net = cnn(context=3)
    x, c = draw((4, 2, 3, 3), seed=5), draw((4, 3), seed=6)
    torch.testing.assert_close(net(x, c), manual_cnn(net, x, c), rtol=0, atol=1e-12)
    # (5, 1, 3) contexts with (4, 2, H, W) images: (5, 4, 4, H, W)
    contexts = draw((5, 1, 3), seed=7)
    out = net(x, contexts)
    assert out.shape == (5, 4, 4, 3, 3)
    for i in range(5):
        torch.testing.assert_close(out[i], manual_cnn(net, x, contexts[i].expand(4, 3)), rtol=0, atol=1e-12)
    # one image, several contexts; several images, one context
    assert net(x[0], contexts[:, 0]).shape == (5, 4, 3, 3)
    torch.testing.assert_close(net(x, contexts[0, 0]), manual_cnn(net, x, contexts[0].expand(4, 3)), rtol=0, atol=1e-12)
    assert (out[0] - out[1]).abs().max() > 1e-6  # the context is used


def test_cnn_output_layer_starts_at_zero_and_rejects_no_hidden_layers():
    torch.manual_seed(0)
    net = CNN(2, 4, hidden=(8, 8), context_features=3)
    out = net(draw((2, 2, 4, 4), torch.float32), draw((2, 3), torch.float32))
    assert torch.equal(out, torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="at least one hidden width"):
        CNN(2, 4, hidden=())


# -- ClassEmbedding ---------------------------------------------------------------------------------------------------
def test_class_embedding_looks_up_rows():
    torch.manual_seed(0)
    embed = ClassEmbedding(5, 3)
    labels = torch.tensor([[0, 4], [2, 2]])
    out = embed(labels)
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out, embed.embedding.weight[labels], rtol=0, atol=0)
    # whole-number float labels are class indices too; the output follows the embedding's dtype
    torch.testing.assert_close(embed(labels.double()), out, rtol=0, atol=0)
    assert embed.double()(torch.tensor(3)).dtype == torch.float64
    assert embed(torch.zeros(0, dtype=torch.long)).shape == (0, 3)


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([0, 5]), r"in \[0, 5\), got values in \[0, 5\]"),
        (torch.tensor([-1, 2]), r"in \[0, 5\), got values in \[-1, 2\]"),
        (torch.tensor([0.0, 1.5]), "whole numbers"),
        (torch.tensor([0.0, float("nan")]), "whole numbers"),
        (torch.tensor([0.0, float("inf")]), "whole numbers"),
        (torch.tensor([True, False]), "integer class indices"),
    ],
    ids=["too-large", "negative", "fractional", "nan", "inf", "bool"],
)
def test_class_embedding_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        ClassEmbedding(5, 3)(labels)


def test_class_embedding_rejects_bad_arguments():
    with pytest.raises(TypeError, match="tensor of class indices"):
        ClassEmbedding(5, 3)([0, 1])
    with pytest.raises(ValueError, match="classes >= 2"):
        ClassEmbedding(1, 3)
    with pytest.raises(ValueError, match="features >= 1"):
        ClassEmbedding(5, 0)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh], ids=["relu", "tanh"])
def test_activation_in_place_gives_the_out_of_place_values_and_gradients(activation):
    """MLP and MADE apply ReLU and Tanh to each layer's fresh output in place (nn.mlp.activate): the same outputs
    and gradients as out of place, and the layer's input is untouched; other activations are not in place."""
    from pyro_flows.nn.mlp import activate

    h = torch.randn(7, 5)
    kept = h.clone()
    assert torch.equal(activate(activation(), h.clone()), activation()(kept))
    assert torch.equal(activate(torch.nn.SiLU(), h), F.silu(kept)) and torch.equal(h, kept)  # others: not in place
    torch.manual_seed(0)
    for net in (
        MLP(3, 4, hidden=(8, 8), zero_init=False, activation=activation),
        MADE(3, 2, hidden=(8, 8), activation=activation),
    ):
        torch.nn.init.normal_(net.output.weight)
        x = torch.randn(6, 3, requires_grad=True)
        out = net(x)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x)
        h = x
        for layer in net.hidden:  # the same network, activations out of place
            h = activation()(layer(h))
        reference = net.output(h)
        reference = reference.unflatten(-1, out.shape[-2:]) if isinstance(net, MADE) else reference
        (grad_reference,) = torch.autograd.grad(reference.square().sum(), x)
        assert torch.equal(out, reference) and torch.equal(grad_x, grad_reference)


def _networks():
    torch.manual_seed(0)
    nets = [
        MLP(3, 4, hidden=(8, 8), context_features=2, zero_init=False),
        MLP(3, 4, hidden=(8, 8, 8), zero_init=False, residual=True, activation=nn.Tanh),
        MADE(3, 2, hidden=(8, 6, 8), context_features=2, activation=nn.Tanh),
        MADE(3, 2, hidden=(16,)),
    ]
    for net in nets:
        torch.nn.init.normal_(net.output.weight)
    return nets


def _call(net, x, c):
    return net(x, c if net.context_features else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hidden_layers_without_gradients_reuse_buffers_and_give_the_graph_values(dtype):
    """Without gradients the hidden activations go to the thread's workspace (nn.mlp.hidden_layers): the values
    of the graph-recording path, in batches of any shape, under no_grad and inference_mode alike; an earlier
    result is not overwritten by a later call; past WORKSPACE_BYTES the layers allocate as before."""
    from pyro_flows.nn import mlp

    x, c = torch.randn(2, 5, 3, dtype=dtype), torch.randn(5, 2, dtype=dtype)
    for net in _networks():
        net.to(dtype)
        expected = _call(net, x, c)  # recorded graph: no workspace
        with torch.no_grad():
            first = _call(net, x, c)
            kept = first.clone()
            _call(net, 2 * x, c)  # the same buffers again
        with torch.inference_mode():
            in_inference = _call(net, x, c)
        with torch.no_grad():  # the buffers made under inference_mode are ordinary tensors: writable here
            again = _call(net, x, c)
        torch.testing.assert_close(first, expected)
        assert torch.equal(first, kept) and torch.equal(in_inference, first) and torch.equal(again, first)
    assert any(key[2] == dtype for key in mlp._WORKSPACE.buffers)  # the no-grad calls used the workspace
    small = mlp.WORKSPACE_BYTES
    try:
        mlp.WORKSPACE_BYTES = 16  # nothing fits: fresh tensors
        mlp.clear_workspace()
        with torch.no_grad():
            assert torch.equal(_call(_networks()[0].to(dtype), x, c), _call(_networks()[0].to(dtype), x, c))
        assert not mlp._WORKSPACE.buffers
    finally:
        mlp.WORKSPACE_BYTES = small


def test_hidden_layers_without_gradients_keep_forward_mode_tangents():
    """Forward-mode AD under no_grad (a dual level entered) takes the layers' own calls, not the workspace's out=
    matmuls, which carry no tangent: the tangent is the Jacobian-vector product of autograd's reverse mode."""
    import torch.autograd.forward_ad as forward_ad

    net = _networks()[0].double()
    x, c, v = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3).double()
    with torch.no_grad(), forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(net(forward_ad.make_dual(x, v), c)).tangent
    expected = torch.autograd.functional.jvp(lambda x: net(x, c), x, v)[1]
    torch.testing.assert_close(tangent, expected)


def test_hidden_layers_workspace_is_per_thread_and_respects_hooks():
    """Threads evaluating one network at once each get their own buffers (the serial values); a forward hook on a
    hidden layer still runs without gradients (the layers are then called as modules)."""
    import threading

    net = _networks()[2]
    inputs = [torch.randn(64, 3) for _ in range(4)]
    c = torch.randn(2)
    with torch.no_grad():
        serial = [net(x, c) for x in inputs]
    results: dict[int, list] = {}

    def work(i):
        with torch.no_grad():
            results[i] = [net(inputs[(i + k) % 4], c) for k in range(50)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        assert all(torch.equal(out, serial[(i + k) % 4]) for k, out in enumerate(outs))
    seen = []
    handle = net.hidden[1].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        assert torch.equal(net(inputs[0], c), serial[0])
    handle.remove()
    assert seen == [torch.Size([64, 6])]


def test_soft_clamp_derivative_under_autograd_and_torch_func():
    """soft_clamp's one-node backward and its torch.func fallback give the analytic slope (1 + |x|/b)^-2."""
    from pyro_flows.nn.mlp import soft_clamp

    x = torch.linspace(-7.0, 7.0, 11, dtype=torch.float64, requires_grad=True)
    slope = (1 + x.detach().abs() / 2.0) ** -2
    (grad,) = torch.autograd.grad(soft_clamp(x, 2.0).sum(), x)
    torch.testing.assert_close(grad, slope, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.func.jacrev(lambda v: soft_clamp(v, 2.0))(x.detach()), torch.diag(slope))
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(lambda v: soft_clamp(v, 2.0)))(x.detach()), slope)
