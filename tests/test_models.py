import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.models import count_params, make_model


def _param_count(name, stem):
    model = make_model(name, stem)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False),
                            jax.random.PRNGKey(0))
    return count_params(shapes["params"])


@pytest.mark.parametrize("name, stem, expected", [
    ("resnet18", "imagenet", 11_181_642),  # torchvision resnet18(num_classes=10)
    ("resnet152", "imagenet", 58_164_298),  # torchvision resnet152(num_classes=10)
    ("resnet34", "imagenet", 21_289_802),
    ("resnet50", "imagenet", 23_528_522),
    # The CIFAR stem swaps the 7x7x3x64 kernel for a 3x3x3x64 one: 9,408 - 1,728 fewer.
    ("resnet18", "cifar", 11_181_642 - 7680),
    # air-s: 3x3 convolutions 3-16, 16-32, 32-32, 32-64, 64-64, 64-64, 64-64 (no bias), seven
    # BatchNorms (scale and bias) and a bias-free 64-10 classifier.
    ("air-s", "cifar", 9 * (3 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 3 * 64 * 64)
     + 2 * (16 + 2 * 32 + 4 * 64) + 64 * 10),
])
def test_parameter_counts_match_torchvision(name, stem, expected):
    assert _param_count(name, stem) == expected


def test_batch_stats_hold_running_mean_and_var_only():
    model = make_model("tiny", "cifar")
    variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False),
                               jax.random.PRNGKey(0))
    names = {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]}
    assert names == {"mean", "var"}


@pytest.mark.parametrize("name, stem", [("tiny", "imagenet"), ("tiny", "cifar"),
                                        ("air-s", "cifar")])
def test_forward_shapes(name, stem):
    model = make_model(name, stem)
    x = jnp.ones((4, 32, 32, 3))
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(0))
    logits, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_weighted_batchnorm_ignores_padding():
    """A padded batch (weight 0 rows) gives the logits and statistics of the unpadded batch."""
    model = make_model("tiny", "cifar")
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 32, 32, 3))
    junk = 100.0 * jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.PRNGKey(0))
    apply = jax.jit(lambda v, x, w: model.apply(v, x, train=True, weight=w, mutable=["batch_stats"]))
    ref, ref_stats = apply(variables, x, None)
    weight = jnp.array([1.0] * 6 + [0.0] * 2)
    out, stats = apply(variables, jnp.concatenate([x, junk]), weight)
    np.testing.assert_allclose(out[:6], ref, rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 stats, ref_stats)  # tree.map: the structures must match


def test_unknown_model_and_stem_are_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        make_model("resnet19")
    with pytest.raises(ValueError, match="unknown stem"):
        make_model("resnet18", "mnist")


def test_bf16_compute_keeps_float32_parameters_and_logits():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    fp32, bf16 = make_model("tiny", "cifar"), make_model("tiny", "cifar", dtype=jnp.bfloat16)
    variables = jax.jit(lambda k: bf16.init(k, x, train=False))(jax.random.PRNGKey(0))
    assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
    apply = jax.jit(lambda m, v: m.apply(v, x, train=False), static_argnums=0)
    low, high = apply(bf16, variables), apply(fp32, variables)
    assert low.dtype == jnp.float32
    assert not np.array_equal(low, high)  # really computed in bfloat16
    np.testing.assert_allclose(low, high, rtol=0.1, atol=0.05)
    hlo = jax.jit(lambda v: bf16.apply(v, x, train=False)).lower(variables).as_text()
    assert "bf16" in hlo and "convolution" in hlo


def test_flip_evaluation_averages_an_image_and_its_mirror():
    from jaxunlearn import ensemble, steps

    model, tx = make_model("air-s"), steps.make_optimizer("sgd", 0.1)
    state = jax.jit(ensemble.init_ensemble, static_argnums=(0, 1, 3))(
        model, tx, jax.random.PRNGKey(0), 1)
    state = jax.tree.map(lambda x: x[0], state)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    mirrored = images[:, :, ::-1, :]
    idx = jnp.arange(4)
    plain = steps.eval_logits(model, state, images, idx)
    flipped = steps.eval_logits(model, state, images, idx, flip=True)
    np.testing.assert_allclose(flipped, 0.5 * (plain + steps.eval_logits(model, state, mirrored,
                                                                          idx)), rtol=1e-5)
    np.testing.assert_allclose(flipped, steps.eval_logits(model, state, mirrored, idx, flip=True),
                               rtol=1e-5, atol=1e-6)  # invariant to mirroring
    assert not np.allclose(plain, flipped)


def test_learning_rate_schedules_and_label_smoothing():
    from jaxunlearn import steps

    p = np.linspace(0, 1, 11)
    np.testing.assert_allclose(steps.lr_scale("constant", p), 1.0)
    s = steps.lr_scale("onecycle", p, warmup=0.2)
    np.testing.assert_allclose(s[[0, 1, 2, 6, 10]], [0.1, 0.55, 1.0, 0.5, 0.0], atol=1e-12)
    logits = jnp.array([[2.0, 0.0, -1.0]])
    smoothed = steps.cross_entropy(logits, jnp.array([0]), 0.3)
    log_p = jax.nn.log_softmax(logits)[0]
    want = -(0.8 * log_p[0] + 0.1 * log_p[1] + 0.1 * log_p[2])  # 1 - 0.3 + 0.3/3 on the label
    np.testing.assert_allclose(smoothed, [want], rtol=1e-6)
    np.testing.assert_allclose(steps.cross_entropy(logits, jnp.array([0])), [-log_p[0]],
                               rtol=1e-6)


def _autodiff_batch_norm(x, w, scale, bias, epsilon=1e-5):
    """The weighted training-mode BatchNorm written plainly, for autodiff to differentiate."""
    wb = w.reshape(-1, 1, 1, 1)
    n = jnp.maximum(jnp.sum(w) * x.shape[1] * x.shape[2], 1.0)
    mean = jnp.sum(x * wb, (0, 1, 2)) / n
    var = jnp.sum(jnp.square(x - mean) * wb, (0, 1, 2)) / n
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


@pytest.mark.parametrize("weights", [[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0], [0.5, 2, 0, 1, 1, 3]])
def test_batch_norm_gradient_by_hand_equals_autodiff(weights):
    from jaxunlearn.models import batch_norm_train

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k[0], (6, 4, 4, 3)) * 2 + 1
    w = jnp.asarray(weights, jnp.float32)
    scale, bias = jax.random.normal(k[1], (3,)), jax.random.normal(k[2], (3,))
    g = jax.random.normal(k[3], x.shape)  # an arbitrary cotangent, padding's included

    def hand(x, s, b):
        return jnp.sum(batch_norm_train(x, w, s, b, 1e-5)[0] * g)

    def auto(x, s, b):
        return jnp.sum(_autodiff_batch_norm(x, w, s, b) * g)

    np.testing.assert_allclose(batch_norm_train(x, w, scale, bias, 1e-5)[0],
                               _autodiff_batch_norm(x, w, scale, bias), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.grad(hand, (0, 1, 2))(x, scale, bias),
                         jax.grad(auto, (0, 1, 2))(x, scale, bias)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_max_pool_2x2_equals_flax_max_pool_and_routes_the_gradient_to_the_maximum():
    import flax.linen as nn

    from jaxunlearn.models import max_pool_2x2

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4, 3))
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
    odd = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 3))
    np.testing.assert_array_equal(max_pool_2x2(odd), nn.max_pool(odd, (2, 2), strides=(2, 2)))
    # Without ties both gradients are 1 at each window's maximum and 0 elsewhere.
    np.testing.assert_array_equal(
        jax.grad(lambda x: jnp.sum(max_pool_2x2(x)))(x),
        jax.grad(lambda x: jnp.sum(nn.max_pool(x, (2, 2), strides=(2, 2))))(x))


def test_step_compiler_options_keep_only_what_this_jaxlib_knows(monkeypatch):
    from jaxunlearn import xla_options

    monkeypatch.setitem(xla_options.STEP_OPTIONS, jax.default_backend(),
                        {"xla_no_such_option_anywhere": True})
    assert xla_options.step_compiler_options() is None  # dropped, not an error at run time
    monkeypatch.setenv("JAXUNLEARN_XLA_DEFAULTS", "1")
    assert xla_options.step_compiler_options() is None
