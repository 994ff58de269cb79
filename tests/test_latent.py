"""pyro_flows.latent: encode/decode round trips for every kind of flow, interpolation, attribute edits, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import perturb

import pyro_flows as pf
from pyro_flows.latent import attribute_direction, decode, encode, interpolate, shift

SHAPE = (1, 28, 28)


def _glow(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {"levels": 2, "steps": 2, "hidden_channels": 8, "pixel_levels": None, **kwargs}
    return pf.Glow(SHAPE, **options)


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Smooth 28x28 images in [0, 1]: blurred noise, the kind of structure a flow meets in data."""
    noise = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2)


def _assert_round_trip(model, x, context=None, atol=1e-4):
    z = encode(model, x, context)
    assert z.shape == x.shape
    assert z.dtype == torch.float32
    back = decode(model, z, context)
    assert (back - x).abs().max().item() < atol
    return z


def test_glow_28x28_round_trip_at_init():
    glow = _glow()
    x = _images()
    z = _assert_round_trip(glow, x)
    # the encoding is the flow's: log p(x) = log N(z) + log|det J_{f^-1}(x)|, with the layers' own log-dets
    assert not torch.allclose(z, x, atol=1e-2)


def test_glow_28x28_round_trip_after_training():
    glow = _glow()
    x = _images(32)
    before = {name: p.detach().clone() for name, p in glow.named_parameters()}
    history = pf.fit(glow, x, max_steps=4, batch_size=16, lr=1e-2, seed=0, progress=False, validation_fraction=0)
    assert history.steps == 4
    # training moved every layer, the zero-initialised last convolutions of the couplings too
    changed = [name for name, p in glow.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)
    _assert_round_trip(glow, x[:4])


def test_decode_encode_round_trip_of_latent_points():
    glow = perturb(_glow(), scale=0.05)
    glow.eval()
    z = torch.randn(3, *SHAPE)
    back = encode(glow, decode(glow, z))
    assert (back - z).abs().max().item() < 1e-3  # the base is the wider space: errors grow by the scales


def test_class_conditional_glow_round_trip_and_transfer():
    glow = perturb(_glow(classes=3), scale=0.05)
    x, labels = _images(4), torch.tensor([0, 1, 2, 1])
    z = _assert_round_trip(glow, x, labels)
    # another label decodes the same latent point to another image; the encoding depends on the label
    assert not torch.allclose(decode(glow, z, torch.tensor([1, 2, 0, 0])), x, atol=1e-3)
    assert not torch.allclose(encode(glow, x, torch.zeros(4, dtype=torch.long)), z, atol=1e-3)
    # one label broadcasts over a batch of points, as in log_prob
    path = interpolate(z[0], z[1], steps=5)
    assert decode(glow, path, torch.tensor([0])).shape == (5, *SHAPE)


def test_image_conditioned_glow_round_trip():
    # super-resolution: a 14x14 condition image for each 28x28 image, aligned at every level
    glow = perturb(_glow(context_shape=(1, 14, 14), context_channels=4), scale=0.05)
    x = _images(3)
    cond = torch.nn.functional.avg_pool2d(x, 2)
    z = _assert_round_trip(glow, x, cond)
    assert not torch.allclose(decode(glow, z, cond.flip(0)), x, atol=1e-3)
    with pytest.raises(ValueError, match="batch shape"):
        encode(glow, x, cond[:2])


def test_signal_flow_round_trip():
    from pyro_flows.flows.signals import WaveGlow

    torch.manual_seed(0)
    flow = perturb(WaveGlow((2, 64), steps=2, groups=4, hidden_channels=8, layers=2, context_shape=(3, 16)), 0.05)
    x, features = torch.randn(4, 2, 64), torch.randn(4, 3, 16)
    _assert_round_trip(flow, x, features)


def test_vector_context_and_vector_flows():
    torch.manual_seed(0)
    for flow in (pf.NSF(features=3, context=2), perturb(pf.MAF(features=3, context=2), scale=0.05)):
        x, c = torch.randn(5, 3), torch.randn(5, 2)
        _assert_round_trip(flow, x, c, atol=1e-4)


def test_multiscale_realnvp_round_trip():
    torch.manual_seed(0)
    flow = perturb(pf.RealNVP(shape=SHAPE, levels=3, steps=1, hidden=(8,), pixel_levels=None), scale=0.05)
    _assert_round_trip(flow, _images(3))


def test_distribution_is_accepted_and_matches_to_base():
    glow = perturb(_glow(), scale=0.05)
    x = _images(2)
    d = glow()
    assert torch.equal(encode(d, x), d.to_base(x))
    assert torch.equal(decode(d, encode(d, x)), d.from_base(d.to_base(x)))
    with pytest.raises(ValueError, match="already conditioned"):
        encode(d, x, torch.tensor([0, 1]))


def test_dequantized_model_round_trip_is_exact():
    torch.manual_seed(0)
    model = perturb(pf.Glow(SHAPE, levels=2, steps=1, hidden_channels=8, pixel_levels=256), scale=0.05)
    pixels = torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8)
    z = encode(model, pixels)
    # the latent point of the centre of each pixel's dequantisation cell
    assert torch.allclose(z, model.flow().to_base((pixels.float() + 0.5) / 256))
    assert torch.equal(decode(model, z), pixels.float())
    with pytest.raises(ValueError, match="pixels must be integers"):
        encode(model, pixels.float() / 255)


def test_encode_is_differentiable():
    flow = pf.RealNVP(features=2)
    x = torch.randn(4, 2, requires_grad=True)
    encode(flow, x).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_linear_interpolation_endpoints_and_midpoint():
    z0, z1 = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    path = interpolate(z0, z1, steps=5)
    assert path.shape == (5, 2, 1, 4, 4)
    assert torch.equal(path[0], z0) and torch.equal(path[-1], z1)
    assert torch.allclose(path[2], (z0 + z1) / 2)
    assert torch.allclose(path[1:] - path[:-1], (z1 - z0).expand(4, *z0.shape) / 4, atol=1e-6)


def test_slerp_keeps_equal_norms_and_hits_endpoints():
    generator = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(1, 28, 28, generator=generator), torch.randn(1, 28, 28, generator=generator)
    z1 = z1 * z0.norm() / z1.norm()
    path = interpolate(z0, z1, steps=9, method="spherical")
    assert torch.equal(path[0], z0) and torch.equal(path[-1], z1)
    assert torch.allclose(path.flatten(1).norm(dim=-1), z0.norm().expand(9), rtol=1e-5)
    # the points lie on the great circle, evenly spaced in angle
    cosines = torch.nn.functional.cosine_similarity(path[:-1].flatten(1), path[1:].flatten(1))
    assert torch.allclose(cosines, cosines[0].expand(8), atol=1e-5)
    # a linear path's midpoint is shorter, by cos(omega / 2)
    omega = torch.acos(torch.nn.functional.cosine_similarity(z0.flatten(), z1.flatten(), dim=0))
    middle = interpolate(z0, z1, steps=3)[1]
    assert math.isclose(middle.norm() / z0.norm(), math.cos(omega / 2), rel_tol=1e-4)


def test_slerp_quarter_circle_closed_form():
    path = interpolate(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]), steps=4, method="spherical")
    angles = torch.atan2(path[:, 1], path[:, 0])
    assert torch.allclose(angles, torch.tensor([0.0, 1.0, 2.0, 3.0]) * math.pi / 6, atol=1e-6)
    assert torch.allclose(path.norm(dim=-1), torch.full((4,), 2.0))


def test_slerp_batch_of_pairs_with_event_dim():
    z0, z1 = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    z1 = z1 * (z0.flatten(1).norm(dim=-1) / z1.flatten(1).norm(dim=-1)).reshape(3, 1, 1, 1)
    path = interpolate(z0, z1, steps=6, method="spherical", event_dim=3)
    assert path.shape == (6, 3, 1, 4, 4)
    assert torch.allclose(path.flatten(2).norm(dim=-1), z0.flatten(1).norm(dim=-1).expand(6, 3), rtol=1e-5)
    for i in range(3):  # each pair is interpolated on its own
        assert torch.allclose(path[:, i], interpolate(z0[i], z1[i], steps=6, method="spherical"), atol=1e-6)


def test_slerp_of_parallel_or_zero_points_is_linear():
    z = torch.tensor([1.0, 2.0])
    for z1 in (2 * z, torch.zeros(2)):
        path = interpolate(z, z1, steps=3, method="spherical")
        assert torch.allclose(path, interpolate(z, z1, steps=3)) and bool(torch.isfinite(path).all())


def test_attribute_direction_and_shift():
    z_a, z_b = torch.randn(5, 1, 4, 4), torch.randn(7, 1, 4, 4)
    direction = attribute_direction(z_a, z_b)
    assert direction.shape == (1, 4, 4)
    assert torch.allclose(direction, z_a.mean(0) - z_b.mean(0))
    z = torch.randn(2, 1, 4, 4)
    assert torch.equal(shift(z, direction, 0.0), z)  # strength 0 is the identity
    assert torch.equal(shift(z, direction, 0), z)
    assert torch.allclose(shift(z_b, direction).mean(0), z_a.mean(0), atol=1e-6)  # strength 1: onto a's mean
    edits = shift(z, direction, torch.tensor([-1.0, 0.0, 2.0]))
    assert edits.shape == (3, 2, 1, 4, 4)
    assert torch.equal(edits[1], z) and torch.allclose(edits[2], z + 2 * direction)


def test_attribute_edit_decodes_through_a_conditional_flow():
    glow = perturb(_glow(classes=2), scale=0.05)
    x, labels = _images(4), torch.tensor([0, 0, 1, 1])
    z = encode(glow, x, labels)
    direction = attribute_direction(z[labels == 1], z[labels == 0])
    edited = decode(glow, shift(z[:1], direction, [0.0, 1.0]), labels[:1])
    assert edited.shape == (2, 1, *SHAPE)
    assert (edited[0] - x[:1]).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: interpolate(torch.zeros(2, 3), torch.zeros(3, 2)), "same shape"),
        (lambda: interpolate(torch.zeros(2), torch.zeros(2), method="cubic"), "unknown method 'cubic'"),
        (lambda: interpolate(torch.zeros(2), torch.zeros(2), steps=1), "steps must be an integer >= 2"),
        (lambda: interpolate(torch.zeros(2), torch.zeros(2), event_dim=2), "event_dim must be an integer in 1..1"),
        (lambda: interpolate(torch.zeros(2), torch.zeros(2, dtype=torch.float64)), "same dtype"),
        (lambda: interpolate(torch.zeros(2), torch.tensor([0.0, math.nan])), "z1 has NaN"),
        (lambda: attribute_direction(torch.zeros(2, 3), torch.zeros(2, 4)), "same shape after the first"),
        (lambda: attribute_direction(torch.zeros(0, 3), torch.zeros(2, 3)), "z_a must hold at least one"),
        (lambda: shift(torch.zeros(2, 3), torch.zeros(2)), "trailing dims of z"),
        (lambda: shift(torch.zeros(3), torch.zeros(3), [[1.0]]), "strength must be a finite number"),
        (lambda: shift(torch.zeros(3), torch.zeros(3), math.inf), "strength must be a finite number"),
        (lambda: shift(torch.zeros(3, dtype=torch.long), torch.zeros(3)), "floating-point"),
    ],
)
def test_latent_arithmetic_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


class _NotAFlow(torch.nn.Module):
    def forward(self, context=None):
        return torch.distributions.Normal(0.0, 1.0)


def test_encode_decode_errors_name_the_problem():
    glow = _glow(classes=3)
    x = _images(2)
    with pytest.raises(ValueError, match=r"data must have shape \(\.\.\., 1, 28, 28\)"):
        encode(glow, torch.zeros(2, 1, 14, 14), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"batch shape \(2,\).*flow's batch shape \(3,\)"):
        encode(glow, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"encode: the data tensor has dtype torch.float64 but the flow has"):
        encode(glow, x.double(), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"decode: the latent points tensor has dtype torch.float64.*flow.to\("):
        decode(glow, torch.zeros(2, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN or inf"):
        encode(glow, torch.full_like(x, math.nan), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="latent points must have shape"):
        decode(glow, torch.zeros(2, 784), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="is conditional"):
        encode(glow, x)
    with pytest.raises(ValueError, match="is unconditional"):
        encode(_glow(), x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="expected a flow"):
        encode(lambda: None, x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a flow's distribution"):
        encode(_NotAFlow(), x)
