"""28x28 images and torchvision-style pipelines: pf.Glow / pf.RealNVP(shape=...) at MNIST's size, pf.fit on a
torch Dataset of (image, label) items, uint8 pixels, and the checks that keep the data and ``pixel_levels`` agreed.

torchvision is not needed: :class:`Images` stands in for its datasets (items ``(image, label)``, images ``uint8``
as ``PILToTensor`` gives them or floats as ``ToTensor`` gives them).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import perturb
from torch.utils.data import DataLoader, Dataset

import pyro_flows as pf
import pyro_flows.transforms as T

MNIST = (1, 28, 28)
CLASSES = 10


class Images(Dataset):
    """A torchvision-like dataset: ``(image, label)`` items (an ``int`` label, as torchvision's), ``(image,
    condition)`` items when ``labels`` are float rows, ``image`` alone without ``labels``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        if self.labels is None:
            return self.images[index]
        if self.labels.is_floating_point():
            return self.images[index], self.labels[index]
        return self.images[index], int(self.labels[index])


def random_digits(n: int, high: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random uint8 images of MNIST's shape with pixels in ``0 .. high - 1``, and labels in ``0 .. 9``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, high, (n, *MNIST), generator=generator).to(torch.uint8)
    return images, torch.randint(0, CLASSES, (n,), generator=generator)


def quiet_fit(model, data, **kwargs):
    return pf.fit(model, data, progress=False, **{"seed": 0, "batch_size": 8, "max_steps": 2, **kwargs})


# -- 28x28 presets ----------------------------------------------------------------------------------------------------
PRESETS = {
    # Glow squeezes at every level: 28 -> 14 -> 7, couplings at 4x14x14 and 4x7x7
    "glow-2-levels": lambda **kw: pf.Glow(MNIST, levels=2, steps=1, hidden_channels=4, **kw),
    # RealNVP's last level does not squeeze: checkerboards at 28x28 and 14x14 ...
    "realnvp-2-levels": lambda **kw: pf.RealNVP(shape=MNIST, levels=2, steps=1, hidden=(4,), **kw),
    # ... and with 3 levels at the odd 7x7, below two factor-outs
    "realnvp-3-levels": lambda **kw: pf.RealNVP(shape=MNIST, levels=3, steps=1, hidden=(4,), **kw),
}
# the shapes each preset factors out at (data side first) and the size of its coarsest couplings
FACTOR_OUTS = {
    "glow-2-levels": ([(4, 14, 14)], 7),
    "realnvp-2-levels": ([(4, 14, 14)], 14),
    "realnvp-3-levels": ([(4, 14, 14), (8, 7, 7)], 7),
}


def continuous(name: str, **kwargs) -> pf.Flow:
    """The named preset as a continuous flow in float64, perturbed so that no layer is the identity."""
    torch.manual_seed(0)
    return perturb(PRESETS[name](pixel_levels=None, **kwargs).double(), scale=0.2, seed=0).eval()


@pytest.mark.parametrize("name", PRESETS)
def test_28x28_presets_factor_out_at_every_level_but_the_last(name):
    model = PRESETS[name]()
    shapes = [tuple(m.event_shape) for m in model.modules() if isinstance(m, T.FactorOut)]
    factor_outs, coarsest = FACTOR_OUTS[name]
    assert shapes == factor_outs
    sizes = {m.event_shape[-1] for m in model.modules() if isinstance(m, T.AffineCoupling)}
    assert min(sizes) == coarsest


@pytest.mark.parametrize("name", PRESETS)
def test_28x28_presets_invert_exactly_and_sample_labelled_images(name):
    flow = continuous(name, classes=CLASSES)
    labels = torch.arange(4) % CLASSES
    d = flow(labels)
    z = torch.randn(4, *MNIST, dtype=torch.float64)
    x = d.from_base(z)
    torch.testing.assert_close(d.to_base(x), z, rtol=0, atol=1e-9)
    assert d.sample().shape == (4, *MNIST) and d.sample((3,)).shape == (3, 4, *MNIST)
    model = PRESETS[name](classes=CLASSES, pixel_levels=17)
    samples = model(labels).sample((2,))
    assert samples.shape == (2, 4, *MNIST) and torch.equal(samples, samples.round())
    assert samples.min() >= 0 and samples.max() <= 16


@pytest.mark.parametrize("name", ["glow-2-levels", "realnvp-3-levels"])
def test_28x28_log_prob_is_base_density_plus_the_autograd_log_det(name):
    flow = continuous(name)
    d = flow()
    x = d.from_base(torch.randn(MNIST, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))

    def inverse(values):
        return d.to_base(values.reshape(MNIST)).reshape(-1)

    jacobian = torch.autograd.functional.jacobian(inverse, x.reshape(-1), vectorize=True)
    z = inverse(x.reshape(-1))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum() + torch.linalg.slogdet(jacobian)[1]
    torch.testing.assert_close(d.log_prob(x), expected, rtol=0, atol=1e-8)


def test_28x28_bits_per_dim_of_uint8_digits_is_the_discrete_bound():
    model = PRESETS["glow-2-levels"](pixel_levels=256).double().eval()
    images, _ = random_digits(4)
    torch.manual_seed(5)
    bits = pf.bits_per_dim(model, images)
    torch.manual_seed(5)
    log_prob = model().log_prob(images.double())
    assert math.isclose(bits, -log_prob.mean().item() / (784 * math.log(2)), rel_tol=1e-12)
    assert 8.0 < bits < 20.0  # an untrained model of uniform 8-bit noise: a little above 8 bits


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: pf.Glow(MNIST, levels=3), "Glow: 3 levels squeeze the image 3 times.*levels 1..2 work"),
        (lambda: pf.RealNVP(shape=MNIST, levels=4), "RealNVP: 4 levels .* 3 times.*levels 1..3 work"),
        (lambda: pf.Glow((1, 7, 7), levels=1), "no levels work: H and W must be even"),
    ],
)
def test_levels_the_size_cannot_squeeze_name_the_levels_that_work(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# -- fit on a Dataset -------------------------------------------------------------------------------------------------
# items -> (the model's conditioning, what the dataset yields besides the image, whether the model sees it)
ITEMS = {
    "labels-as-classes": (dict(classes=3), "labels", True),
    "conditions-as-context": (dict(context=2), "conditions", True),
    "labels-ignored": ({}, "labels", False),
    "images-only": ({}, None, False),
}


@pytest.mark.parametrize("items", ITEMS)
def test_a_dataset_trains_on_the_batches_of_the_same_rows_as_tensors(items):
    """The Dataset's sampler shuffles like tensor rows: with a model without randomness, the losses agree exactly;
    an unconditional model ignores the labels that the dataset yields."""
    torch.manual_seed(0)
    images = torch.rand(32, 1, 4, 4)
    contexts = {"labels": torch.randint(0, 3, (32,)), "conditions": torch.randn(32, 2), None: None}
    conditioning, yielded, seen = ITEMS[items]
    dataset = Images(images, contexts[yielded])

    def model():
        torch.manual_seed(1)
        return pf.RealNVP(shape=(1, 4, 4), levels=2, steps=1, hidden=(4,), pixel_levels=None, **conditioning)

    on_dataset = quiet_fit(model(), dataset, max_steps=None, max_epochs=3)
    context = contexts[yielded] if seen else None
    on_tensors = quiet_fit(model(), images, context=context, max_steps=None, max_epochs=3)
    assert on_dataset.steps == on_tensors.steps == 12
    assert on_dataset.train_loss == on_tensors.train_loss
    other_seed = quiet_fit(model(), dataset, max_steps=None, max_epochs=3, seed=1)
    assert other_seed.train_loss != on_dataset.train_loss


def test_a_dataset_run_resumes_mid_epoch_as_if_uninterrupted(tmp_path):
    generator = torch.Generator().manual_seed(0)
    dataset = Images(torch.randint(0, 17, (32, 1, 4, 4), generator=generator).to(torch.uint8), torch.arange(32) % 3)

    def model():
        torch.manual_seed(1)
        return pf.RealNVP(shape=(1, 4, 4), levels=2, steps=1, hidden=(4,), classes=3, pixel_levels=17)

    options = dict(max_steps=None, max_epochs=3, checkpoint=tmp_path / "run.pt")
    reference = model()
    expected = quiet_fit(reference, dataset, **{**options, "checkpoint": None})
    partial = quiet_fit(model(), dataset, **{**options, "max_steps": 6})  # stops at batch 2 of epoch 2
    assert partial.steps == 6 and partial.train_loss[0] == expected.train_loss[0]
    resumed_model = model()
    resumed = quiet_fit(resumed_model, dataset, resume=options["checkpoint"], **options)
    assert resumed == expected and resumed.steps == 12
    for a, b in zip(resumed_model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_glow_fits_a_dataset_of_uint8_digits_with_labels():
    images, labels = random_digits(34)
    model = pf.Glow(MNIST, levels=2, steps=1, hidden_channels=4, classes=CLASSES)
    before = bits_of(model, images, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full-range 8-bit pixels under the default 256 levels: no warning
        history = quiet_fit(model, Images(images, labels), batch_size=11, max_steps=None, max_epochs=4, lr=1e-2)
    assert history.steps == 4 * 3  # 34 rows in batches of 11: the last batch of one row is left out
    assert bits_of(model, images, labels) < before - 0.05


def test_a_model_without_context_ignores_the_labels_of_a_torchvision_style_loader():
    images, labels = random_digits(16)
    loader = DataLoader(Images(images, labels), batch_size=8)
    assert quiet_fit(PRESETS["glow-2-levels"](), loader).steps == 2
    with pytest.raises(ValueError, match="is unconditional"):  # tensor data with an explicit context stay an error
        quiet_fit(PRESETS["glow-2-levels"](), images, context=labels)


def bits_of(model, images, labels):
    torch.manual_seed(0)
    with torch.no_grad():
        return pf.bits_per_dim(model, images, context=labels)


def test_a_dataset_of_pil_images_asks_for_a_tensor_transform():
    class PILImage:  # what a torchvision dataset without a transform yields
        pass

    class PILImages(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):
            return PILImage(), 0

    with pytest.raises(TypeError, match=r"item 0 is \(PILImage, int\).*PILToTensor\(\)"):
        quiet_fit(PRESETS["glow-2-levels"](), PILImages())


# -- the data against pixel_levels ------------------------------------------------------------------------------------
def as_tensor(images, labels):
    return dict(data=images, context=labels)


def as_dataset(images, labels):
    return dict(data=Images(images, labels))


def as_loader(images, labels):
    return dict(data=DataLoader(Images(images, labels), batch_size=8, shuffle=True))


SOURCES = {"tensor": as_tensor, "dataset": as_dataset, "loader": as_loader}


@pytest.mark.parametrize("source", SOURCES)
def test_digits_far_below_pixel_levels_warn_and_name_the_levels_to_use(source):
    images, labels = random_digits(16, high=17)
    model = pf.Glow(MNIST, levels=2, steps=1, hidden_channels=4, classes=CLASSES)  # 256 levels by default
    with pytest.warns(
        UserWarning, match=r"largest pixel value is 16, far below pixel_levels - 1 = 255.*pixel_levels=17"
    ):
        quiet_fit(model, **SOURCES[source](images, labels))
    matched = pf.Glow(MNIST, levels=2, steps=1, hidden_channels=4, classes=CLASSES, pixel_levels=17)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet_fit(matched, **SOURCES[source](images, labels))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(
    "pixels, message",
    [
        # torchvision's ToTensor(): floats in [0, 1]
        (
            lambda x: x.float() / 255,
            r"pixels must be integers in \[0, 255\] \(pixel_levels=256\); these are floats "
            r"in \[0, 1\].*\(x \* 255\)\.round\(\)\.to\(torch\.uint8\)",
        ),
        (lambda x: x.long() + 45, r"range over \[45, 300\]; for data in 0..300 build the model with pixel_levels=301"),
        (lambda x: x.float() - 1, r"range over \[-1, 254\]"),
        (lambda x: x.float() + 0.5, r"not whole numbers, e.g. \d+\.5"),
    ],
)
def test_pixels_that_pixel_levels_cannot_hold_are_refused_with_what_was_found(source, pixels, message):
    images, labels = random_digits(16)
    images[0, 0, 0, 0] = 255
    model = pf.Glow(MNIST, levels=2, steps=1, hidden_channels=4, classes=CLASSES)
    with pytest.raises(ValueError, match=message):
        quiet_fit(model, **SOURCES[source](pixels(images), labels))
    with pytest.raises(ValueError, match=message):  # the model's own log_prob says the same
        model(labels).log_prob(pixels(images))


@pytest.mark.parametrize("source", SOURCES)
def test_nan_pixels_are_refused(source):
    images, labels = random_digits(16)
    images = images.float()
    images[3, 0, 5, 5] = float("nan")
    model = pf.Glow(MNIST, levels=2, steps=1, hidden_channels=4, classes=CLASSES)
    with pytest.raises(ValueError, match="NaN"):
        quiet_fit(model, **SOURCES[source](images, labels))


@pytest.mark.parametrize("source", SOURCES)
def test_labels_out_of_range_are_refused(source):
    images, labels = random_digits(16)
    labels[2] = CLASSES
    model = pf.Glow(MNIST, levels=2, steps=1, hidden_channels=4, classes=CLASSES)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        quiet_fit(model, **SOURCES[source](images, labels))


@pytest.mark.parametrize("source", SOURCES)
def test_images_of_another_size_are_refused(source):
    images, labels = random_digits(16)
    model = pf.Glow((1, 32, 32), levels=2, steps=1, hidden_channels=4, classes=CLASSES)
    with pytest.raises(ValueError, match=r"must have shape \(\.\.\., 1, 32, 32\), got \(8, 1, 28, 28\)"):
        quiet_fit(model, **SOURCES[source](images, labels))


def test_uint8_pixels_give_the_log_prob_of_the_same_values_as_floats():
    images, labels = random_digits(3)
    model = PRESETS["realnvp-2-levels"](classes=CLASSES, pixel_levels=256)
    torch.manual_seed(4)
    from_uint8 = model(labels).log_prob(images)
    torch.manual_seed(4)
    torch.testing.assert_close(from_uint8, model(labels).log_prob(images.float()), rtol=0, atol=0)
