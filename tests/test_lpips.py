"""LPIPS / VGG16: shapes at real size, properties, converter key handling, parity with numpy and torch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import save_file

from jaxunified.convert import CheckpointMismatchError, load
from jaxunified.convert.lpips import VGG16_CONV_INDICES, load_lpips, load_vgg16
from jaxunified.models.lpips import LPIPS, SCALE, SHIFT, VGG16_BLOCKS, LPIPSConfig, VGG16Features, _unit_normalize

WS = 8  # width_scale for the fast tests: channels 8, 16, 32, 64, 64


def _vgg_shapes(width_scale):
    """(torchvision features index, OIHW weight shape) for the 13 convs."""
    shapes, cin = [], 3
    widths = [w // width_scale for block in VGG16_BLOCKS for w in block]
    for idx, cout in zip(VGG16_CONV_INDICES, widths):
        shapes.append((idx, (cout, cin, 3, 3)))
        cin = cout
    return shapes


def _slice_of(idx):
    return 1 + sum(idx >= s for s in (4, 9, 16, 23))


def _fake_vgg_sd(rng, width_scale, prefix="features"):
    sd = {}
    for idx, shape in _vgg_shapes(width_scale):
        fan_in = shape[1] * 9
        key = f"{prefix}.{idx}" if prefix == "features" else f"net.slice{_slice_of(idx)}.{idx}"
        sd[f"{key}.weight"] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        sd[f"{key}.bias"] = (0.1 * rng.standard_normal(shape[0])).astype(np.float32)
    return sd


def _fake_heads(rng, width_scale):
    chns = [block[-1] // width_scale for block in VGG16_BLOCKS]
    return {f"lin{k}.model.1.weight": np.abs(rng.standard_normal((1, c, 1, 1))).astype(np.float32) / c for k, c in enumerate(chns)}


# jax.random compiles slowly on CPU (seconds per shape with partitionable threefry), so the tests
# draw images and parameters with numpy; jax.eval_shape supplies the parameter tree.
def _images(seed, shape=(2, 32, 32, 3)):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def _np_variables(module, *args, seed=0):
    abstract = nn.meta.unbox(jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return np.abs(rng.standard_normal(leaf.shape)).astype(np.float32) / np.sqrt(fan_in)

    return jax.tree.map(draw, abstract)


def test_real_size_shapes():
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(lambda a: LPIPS().init(jax.random.key(0), a, a), x)
    params = nn.meta.unbox(variables["params"])
    n_vgg = sum(np.prod(p.shape) for p in jax.tree.leaves(params["vgg"]))
    n_lin = sum(np.prod(p.shape) for p in jax.tree.leaves({k: v for k, v in params.items() if k != "vgg"}))
    assert n_vgg == 14_714_688  # torchvision vgg16().features
    assert n_lin == 64 + 128 + 256 + 512 + 512
    out = jax.eval_shape(lambda v, a: LPIPS().apply(v, a, a), variables, x)
    assert out.shape == (1,) and out.dtype == jnp.float32
    taps = jax.eval_shape(lambda a: VGG16Features().init_with_output(jax.random.key(0), a)[0], x)
    assert [t.shape[1:] for t in taps] == [(224, 224, 64), (112, 112, 128), (56, 56, 256), (28, 28, 512), (14, 14, 512)]


def test_logical_axes():
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    boxed = jax.eval_shape(lambda a: LPIPS(LPIPSConfig(width_scale=WS)).init(jax.random.key(0), a, a), x)["params"]
    assert boxed["vgg"]["conv1_1"]["kernel"].names == (None, None, "conv_in", "conv_out")
    assert boxed["vgg"]["conv1_1"]["bias"].names == ("conv_out",)
    assert boxed["lin0"]["kernel"].names == (None, None, "conv_in", "conv_out")


def test_properties():
    m = LPIPS(LPIPSConfig(width_scale=WS))
    x, y = _images(1), _images(2)
    variables = _np_variables(m, x, y)
    f = jax.jit(m.apply)
    d_xy, d_yx, d_xx = f(variables, x, y), f(variables, y, x), f(variables, x, x)
    chex.assert_shape(d_xy, (2,))
    np.testing.assert_allclose(d_xy, d_yx, rtol=1e-5)
    np.testing.assert_allclose(d_xx, 0.0, atol=1e-7)
    assert np.all(np.asarray(d_xy) > 0)


def test_unit_normalize_gradient_finite_at_zero():
    # sqrt'(0) = inf would turn an all-zero feature vector's gradient into NaN.
    feats = jnp.asarray([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    target = jnp.asarray([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    g = jax.grad(lambda f: jnp.sum(jnp.square(_unit_normalize(f, 1e-10) - target)))(feats)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(_unit_normalize(feats, 1e-10)[1], [1 / 3, 2 / 3, 2 / 3], rtol=1e-6)


def _np_conv_relu(x, w, b):
    """NHWC x, OIHW w, 3×3 padding 1, then ReLU; written straight from the definition."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, wd = x.shape[1:3]
    out = np.zeros((x.shape[0], h, wd, w.shape[0]), np.float64)
    for i in range(3):
        for j in range(3):
            out += np.einsum("bhwc,oc->bhwo", xp[:, i : i + h, j : j + wd], w[:, :, i, j])
    return np.maximum(out + b, 0.0)


def test_load_vgg16_full_size_keys_and_first_block(tmp_path):
    rng = np.random.default_rng(0)
    sd = _fake_vgg_sd(rng, 1)
    sd["classifier.0.weight"] = np.zeros((4, 4), np.float32)  # ignored; real size would be 25088×4096
    sd["classifier.6.bias"] = np.zeros((4,), np.float32)
    save_file(sd, str(tmp_path / "vgg16.safetensors"))
    module, variables = load("vgg16", tmp_path / "vgg16.safetensors")
    assert isinstance(module, VGG16Features)
    chex.assert_shape(variables["params"]["conv5_3"]["kernel"], (3, 3, 512, 512))
    x = np.asarray(_images(3, (1, 16, 16, 3)))
    relu1_2 = jax.jit(module.apply)(variables, x)[0]
    ref = _np_conv_relu(_np_conv_relu(x, sd["features.0.weight"], sd["features.0.bias"]), sd["features.2.weight"], sd["features.2.bias"])
    np.testing.assert_allclose(relu1_2, ref, rtol=1e-4, atol=1e-4)


def test_loader_errors(tmp_path):
    rng = np.random.default_rng(0)
    sd = _fake_vgg_sd(rng, WS)
    sd["features.7.weight"] = sd["features.7.weight"][:, :-1]  # wrong in-channels
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch[\s\S]*conv2_2/kernel"):
        load_vgg16(tmp_path / "bad.safetensors", width_scale=WS)

    heads = _fake_heads(rng, WS)
    save_file(heads, str(tmp_path / "heads.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="vgg_path"):
        load_lpips(tmp_path / "heads.safetensors", width_scale=WS)

    good = _fake_vgg_sd(rng, WS)
    del good["features.28.bias"]
    good["features.3.weight"] = np.zeros((1,), np.float32)  # a ReLU index holds no weights
    save_file(good, str(tmp_path / "vgg_missing.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing in checkpoint[\s\S]*conv5_3/bias[\s\S]*features\.3\.weight"):
        load_lpips(tmp_path / "heads.safetensors", vgg_path=tmp_path / "vgg_missing.safetensors", width_scale=WS)

    with pytest.raises(TypeError, match="unknown override"):
        load_vgg16(tmp_path / "bad.safetensors", widthscale=WS)


def _np_lpips(x, y, vgg_sd, heads):
    """LPIPS from the definition, in float64 numpy: scaling, VGG taps, unit-normalise, heads, mean, sum."""
    def taps(img):
        h = (img - np.asarray(SHIFT)) / np.asarray(SCALE)
        out, k = [], 0
        for b, block in enumerate(VGG16_BLOCKS):
            if b:
                n, hh, ww, c = h.shape
                h = h[:, : hh // 2 * 2, : ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
            for _ in block:
                idx = VGG16_CONV_INDICES[k]
                h = _np_conv_relu(h, vgg_sd[f"features.{idx}.weight"], vgg_sd[f"features.{idx}.bias"])
                k += 1
            out.append(h)
        return out

    total = 0.0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        na = a / (np.sqrt((a**2).sum(-1, keepdims=True)) + 1e-10)
        nb = b / (np.sqrt((b**2).sum(-1, keepdims=True)) + 1e-10)
        w = heads[f"lin{k}.model.1.weight"][0, :, 0, 0]
        total = total + (((na - nb) ** 2) @ w).mean(axis=(1, 2))
    return total


def test_lpips_heads_plus_vgg_matches_numpy(tmp_path):
    rng = np.random.default_rng(1)
    vgg_sd, heads = _fake_vgg_sd(rng, WS), _fake_heads(rng, WS)
    save_file(vgg_sd, str(tmp_path / "vgg16.safetensors"))
    save_file(heads, str(tmp_path / "vgg.safetensors"))
    module, variables = load("lpips", tmp_path / "vgg.safetensors", vgg_path=tmp_path / "vgg16.safetensors", width_scale=WS)
    x, y = np.asarray(_images(4, (2, 18, 18, 3))), np.asarray(_images(5, (2, 18, 18, 3)))  # odd sizes after pooling
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x, y), _np_lpips(x, y, vgg_sd, heads), rtol=2e-4)


def test_whole_lpips_state_dict_pt_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(2)
    vgg_sd, heads = _fake_vgg_sd(rng, WS), _fake_heads(rng, WS)
    # A whole LPIPS module's state dict as LlamaGen saves it: net.sliceK.N, lin heads, scaling buffers.
    full = {f"net.slice{_slice_of(int(k.split('.')[1]))}.{k[len('features.'):]}": v for k, v in vgg_sd.items()}
    full.update(heads)
    full["scaling_layer.shift"] = np.asarray(SHIFT, np.float32)[None, :, None, None]
    full["scaling_layer.scale"] = np.asarray(SCALE, np.float32)[None, :, None, None]
    torch.save({k: torch.from_numpy(v) for k, v in full.items()}, tmp_path / "lpips.pth")
    module, variables = load_lpips(tmp_path / "lpips.pth", width_scale=WS)

    x, y = _images(6), _images(7)

    def t_lpips(a, b):
        def taps(img):
            h = (img - torch.tensor(SHIFT).view(1, 3, 1, 1)) / torch.tensor(SCALE).view(1, 3, 1, 1)
            out, k = [], 0
            for bi, block in enumerate(VGG16_BLOCKS):
                if bi:
                    h = F.max_pool2d(h, 2, 2)
                for _ in block:
                    idx = VGG16_CONV_INDICES[k]
                    h = F.relu(F.conv2d(h, torch.from_numpy(vgg_sd[f"features.{idx}.weight"]), torch.from_numpy(vgg_sd[f"features.{idx}.bias"]), padding=1))
                    k += 1
                out.append(h)
            return out

        total = 0
        for k, (fa, fb) in enumerate(zip(taps(a), taps(b))):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + F.conv2d((na - nb) ** 2, torch.from_numpy(heads[f"lin{k}.model.1.weight"])).mean((2, 3))
        return total[:, 0]

    to_t = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)  # noqa: E731
    ref = t_lpips(to_t(x), to_t(y)).numpy()
    np.testing.assert_allclose(jax.jit(module.apply)(variables, x, y), ref, rtol=1e-4)

    # The same file's VGG also loads on its own, and a second VGG source is refused as ambiguous.
    vgg_module, vgg_vars = load_vgg16(tmp_path / "lpips.pth", width_scale=WS)
    chex.assert_trees_all_close(vgg_vars["params"], variables["params"]["vgg"])
    with pytest.raises(CheckpointMismatchError, match="only one source"):
        load_lpips(tmp_path / "lpips.pth", vgg_path=tmp_path / "lpips.pth", width_scale=WS)
