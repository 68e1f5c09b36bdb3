"""Tests of jaxnll/parallel.py: vocabulary-parallel losses, meshes, sharded training state.

Everything runs on the 8 fake CPU devices of conftest.py and is compared with the
single-device result (values and gradients).
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxnll  # noqa: E402
from jaxnll import parallel, reference  # noqa: E402

OPTS = dict(z_loss=1e-3, label_smoothing=0.1, logit_softcap=5.0)


def make(seed=0, b=4, t=6, d=8, v=36, p=0.6, dtype=jnp.float32):
  k = jax.random.split(jax.random.key(seed), 5)
  hidden = jax.random.normal(k[0], (b, t, d)).astype(dtype)
  weight = (jax.random.normal(k[1], (d, v)) / np.sqrt(d) * 2).astype(dtype)
  bias = (0.3 * jax.random.normal(k[2], (v,))).astype(dtype)
  targets = jax.random.randint(k[3], (b, t), 0, v)
  mask = jax.random.bernoulli(k[4], p, (b, t)).at[1].set(False)  # one empty span
  return hidden, weight, bias, targets, mask


def ref_logits(h, w, b):
  return jnp.einsum("btd,dv->btv", h, w, precision="highest") + b


def assert_close(got, want, rtol=1e-5, atol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype, (g.dtype, w.dtype)
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64), rtol, atol)


# ----------------------------------------------------------------------------- meshes


def test_parse_and_make_mesh():
  assert parallel.parse_mesh("data=4, model=2") == {"data": 4, "model": 2}
  mesh = parallel.make_mesh("data=-1,model=2")
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert parallel.make_mesh().shape == {"data": 8}
  for bad in ("data4", "data=0", "data=x", "data=2,data=4", "a=-1,b=-1"):
    with pytest.raises(ValueError, match="mesh"):
      parallel.parse_mesh(bad)
  with pytest.raises(ValueError, match="has 6 devices, but there are 8"):
    parallel.make_mesh("data=3,model=2")


# ----------------------------------------------------------------------------- vocabulary-parallel

# (vocabulary, mesh): the shard count divides V; it does not (padded); V = 9 over 8 shards
# leaves three shards holding nothing but padding.
CASES = [(36, "data=2,model=4"), (37, "data=4,model=2"), (9, "model=8")]


@pytest.mark.parametrize("vocab,mesh_spec", CASES)
def test_fused_scalar_loss_equals_single_device(vocab, mesh_spec):
  mesh = parallel.make_mesh(mesh_spec)
  h, w, b, y, m = make(v=vocab)
  kw = dict(token_chunk=5, vocab_chunk=3, **OPTS)

  def sharded(h, w, b):
    return parallel.linear_nll_loss(h, w, y, m, bias=b, mesh=mesh, **kw)

  def single(h, w, b):
    sums = reference.sequence_nll(ref_logits(h, w, b), y, m, **OPTS)
    return jaxnll.batch_loss(sums, jnp.sum(m, axis=1, dtype=jnp.float32)), sums

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  assert_close(grad(sharded)(h, w, b), grad(single)(h, w, b))
  if vocab != 37:
    return
  # The two schedules (one pass over each logits block, or two) and the other normalisations.
  for schedule, normalize in (("two_pass", "samples"), ("one_pass", "sum")):
    more = dict(kw, normalize=normalize, schedule=schedule)
    got = grad(lambda h, w, b, o=more: parallel.linear_nll_loss(h, w, y, m, bias=b, mesh=mesh, **o))
    ref = dict(OPTS, normalize=normalize, implementation="xla")
    want = grad(lambda h, w, b, o=ref: jaxnll.linear_nll_loss(h, w, y, m, bias=b, **o))
    assert_close(got(h, w, b), want(h, w, b))


@pytest.mark.parametrize("vocab,mesh_spec", CASES[1:])
def test_fused_per_sample_loss_equals_single_device(vocab, mesh_spec):
  mesh = parallel.make_mesh(mesh_spec)
  h, w, b, y, m = make(seed=1, v=vocab)
  weights = jnp.arange(1.0, 5.0)  # a different cotangent per sample

  def run(fn):
    f = lambda h, w, b: fn(h, w, b) @ weights
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, b)

  got = run(
    lambda h, w, b: parallel.linear_sequence_nll(
      h, w, y, m, bias=b, mesh=mesh, token_chunk=4, vocab_chunk=4, **OPTS
    )
  )
  want = run(lambda h, w, b: reference.sequence_nll(ref_logits(h, w, b), y, m, **OPTS))
  assert_close(got, want)
  got_mean = jax.jit(
    lambda: parallel.linear_sequence_nll(h, w, y, m, bias=b, mesh=mesh, reduction="mean")
  )()
  want_mean = reference.sequence_nll(ref_logits(h, w, b), y, m, reduction="mean")
  assert_close(got_mean, want_mean)


def test_bf16_head_as_accurate_as_single_device():
  mesh = parallel.make_mesh("data=2,model=4")
  h, w, _, y, m = make(seed=2, v=37, dtype=jnp.bfloat16)

  def run(fn, *args):
    return jax.jit(jax.value_and_grad(lambda h, w: fn(h, w)[0], argnums=(0, 1)))(*args)

  got = run(lambda h, w: parallel.linear_nll_loss(h, w, y, m, mesh=mesh), h, w)
  single = run(lambda h, w: jaxnll.linear_nll_loss(h, w, y, m), h, w)
  exact = run(
    lambda h, w: jaxnll.linear_nll_loss(h, w, y, m), *(x.astype(jnp.float32) for x in (h, w))
  )
  assert got[0].dtype == jnp.float32 and got[1][0].dtype == got[1][1].dtype == jnp.bfloat16
  np.testing.assert_allclose(got[0], single[0], rtol=1e-5)
  # bf16 gradients: no further from the float32 result than the single-device bf16 ones.
  for g, s, e in zip(got[1], single[1], exact[1], strict=True):
    err = lambda x, e=e: float(jnp.max(jnp.abs(x.astype(jnp.float32) - e)))
    assert err(g) <= 2 * err(s) + 1e-6, (err(g), err(s))
    assert err(g) < 0.01 * float(jnp.max(jnp.abs(e)))


def test_inside_own_shard_map_hidden_gradient_summed_over_shards():
  """The documented low-level use: the caller's shard_map, ``vocab_axis`` / ``vocab_size``;
  per-sample results come out replicated over the vocabulary axis (``out_specs`` without it)."""
  mesh = parallel.make_mesh("model=8")
  h, w, b, y, m = make(seed=3, v=40)

  def local(h, w, b):
    return jaxnll.linear_sequence_nll(h, w, y, m, bias=b, vocab_axis="model", vocab_size=40)

  sharded = jax.shard_map(
    local, mesh=mesh, in_specs=(P(), P(None, "model"), P("model")), out_specs=P()
  )
  f = lambda fn: jax.jit(jax.value_and_grad(lambda *a: fn(*a).sum(), argnums=(0, 1, 2)))
  want = f(lambda h, w, b: reference.sequence_nll(ref_logits(h, w, b), y, m))(h, w, b)
  assert_close(f(sharded)(h, w, b), want)


def test_logits_wrapper_pads_the_vocabulary():
  mesh = parallel.make_mesh("data=2,model=4")
  h, w, b, y, m = make(seed=4, v=37)
  logits = ref_logits(h, w, b)
  f = lambda fn: jax.jit(jax.value_and_grad(lambda x: fn(x) @ jnp.arange(1.0, 5.0)))
  got = f(lambda x: parallel.sequence_nll(x, y, m, mesh=mesh, **OPTS))(logits)
  want = f(lambda x: reference.sequence_nll(x, y, m, **OPTS))(logits)
  assert_close(got, want)


def test_bad_mesh_arguments_are_clear_errors():
  h, w, _, y, m = make(b=3)
  mesh = parallel.make_mesh("data=2,model=4")
  with pytest.raises(ValueError, match="3 rows does not split over the 2 shards"):
    parallel.linear_nll_loss(h, w, y, m, mesh=mesh)
  with pytest.raises(ValueError, match="mesh axis 'vocab' is not in the mesh"):
    parallel.linear_nll_loss(h, w, y, m, mesh=mesh, model_axis="vocab")


# ----------------------------------------------------------------------------- sharded train step


def _train_batches(n=2):
  from jaxnll.train import data as data_lib

  spec = data_lib.BatchSpec(rows=8, length=64, pack=True, segments=8)
  examples = [e for e in data_lib.embedded_examples("train") if len(data_lib.encode(e)[0]) <= 64]
  samples = data_lib.encode_all(examples[::37][:40], 64)
  return list(data_lib.epoch_batches(samples, spec, range(40)))[:n]


def _train(mesh, *, fused, tied, accum, batches):
  import functools

  import optax
  from flax import nnx
  from jax.sharding import NamedSharding

  from jaxnll import train
  from jaxnll.train import runtime
  from jaxnll.train.model import ModelConfig, make_model

  config = ModelConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, tie_embeddings=tied)
  trainer = train.Trainer(make_model(config), optax.adamw(1e-2))
  runtime.annotate_partitioning(trainer, mesh, min_size=256)
  graphdef, state = nnx.split(trainer)
  shardings = runtime.state_shardings(state, mesh)
  state = runtime.place(state, shardings)
  step = jax.jit(
    functools.partial(train.train_step_fn, graphdef, objective=train.SFT(fused=fused)),
    out_shardings=(shardings, NamedSharding(mesh, P())),
  )
  losses, jaxpr = [], None
  with jax.set_mesh(mesh):
    for b in batches:
      b = runtime.global_batch(train.micro_batches(b, accum), mesh)
      jaxpr = jaxpr or str(jax.make_jaxpr(step)(state, b))
      state, out = step(state, b)
      losses.append(float(out["loss"]))
  return losses, state, jaxpr


@pytest.mark.parametrize(
  "mesh_spec,fused,tied,accum",
  [("data=4,model=2", True, False, 2), ("data=2,model=4", False, True, 1)],
)
def test_2d_mesh_train_step_equals_single_device(mesh_spec, fused, tied, accum):
  batches = _train_batches()
  one = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  mesh = parallel.make_mesh(mesh_spec)
  kw = dict(fused=fused, tied=tied, accum=accum, batches=batches)
  want, want_state, _ = _train(one, **kw)
  got, state, jaxpr = _train(mesh, **kw)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)
  # Parameters (and their Adam moments) live sharded: FSDP over data, the head over model.
  head = state["model"]["head"]["kernel"] if not tied else state["model"]["embed"]["embedding"]
  mu = state["optimizer"]["opt_state"][0]["mu"]
  mu_head = mu["head"]["kernel"] if not tied else mu["embed"]["embedding"]
  want_spec = P("data", "model") if not tied else P("model", "data")
  assert head[...].sharding.spec == mu_head[...].sharding.spec == want_spec
  up = state["model"]["blocks"][0]["mlp"]["up"]["kernel"][...]
  assert up.sharding.spec == P(None, "data")
  # The fused head runs vocabulary-parallel (shard_map over the model axis).
  assert ("shard_map" in jaxpr) == fused


# ----------------------------------------------------------------------------- new fused entries


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_segment_and_token_entries_vocab_parallel_equal_single_device(layout):
  """``linear_segment_nll`` and ``linear_token_nll`` (entropy included, temperature on) with the
  vocabulary split over 4 shards (37 columns: padded) and the batch over 2, in both weight
  layouts (the scalar loss too): values and gradients (per-output cotangents) equal the
  single-device ones."""
  mesh = parallel.make_mesh("data=2,model=4")
  h, w, b, y, m = make(seed=5, v=37)
  w = w.T if layout == "vd" else w
  seg = jnp.asarray(np.arange(24).reshape(4, 6) % 3)
  k = jax.random.split(jax.random.key(6), 3)
  ct_seg, ct_nll, ct_ent = (
    jax.random.normal(kk, s) for kk, s in zip(k, [(4, 2), (4, 6), (4, 6)], strict=True)
  )
  kw = dict(token_chunk=4, vocab_chunk=4, temperature=0.7, weight_layout=layout, **OPTS)

  def total(segment, token, loss):
    def f(h, w, b):
      per = segment(h, w, y, m, seg, num_segments=2, bias=b, **kw)
      nll, ent = token(h, w, y, m, bias=b, return_entropy=True, **kw)
      scalar = loss(h, w, y, m, bias=b, **kw)[0]
      return jnp.sum(per * ct_seg) + jnp.sum(nll * ct_nll) + jnp.sum(ent * ct_ent) + scalar

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, b)

  got = total(
    lambda *a, **o: parallel.linear_segment_nll(*a, mesh=mesh, **o),
    lambda *a, **o: parallel.linear_token_nll(*a, mesh=mesh, **o),
    lambda *a, **o: parallel.linear_nll_loss(*a, mesh=mesh, **o),
  )
  want = total(jaxnll.linear_segment_nll, jaxnll.linear_token_nll, jaxnll.linear_nll_loss)
  assert_close(got, want)


# ----------------------------------------------------------------------------- a user's shard_map


def psum_cross_entropy(h, w, b, y, m, axis):
  """Hand-written vocabulary-parallel cross-entropy (Megatron style) for a shard_map body:
  what JAX's own autodiff of ``psum`` makes exact under either ``check_vma``."""
  z = jnp.einsum("btd,dv->btv", h, w, precision="highest") + b
  cols = z.shape[-1]
  offset = jax.lax.axis_index(axis) * cols
  top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(z, axis=-1)), axis)
  lse = top + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(z - top[..., None]), axis=-1), axis))
  local = y - offset
  here = (local >= 0) & (local < cols)
  picked = jnp.take_along_axis(z, jnp.where(here, local, 0)[..., None], axis=-1)[..., 0]
  zy = jax.lax.psum(jnp.where(here, picked, 0.0), axis)
  return jnp.sum(jnp.where(m, lse - zy, 0.0), axis=-1)


def _user_entry(entry, implementation):
  """``local(h, w, b, y, m, seg) -> f32[B]`` calling one jaxnll entry with ``vocab_axis``."""
  kw = dict(vocab_axis="model", vocab_size=40)
  if implementation is not None:
    kw["implementation"] = implementation

  def local(h, w, b, y, m, seg):
    if entry == "handwritten":
      return psum_cross_entropy(h, w, b, y, m, "model")
    if entry == "sequence":
      return jaxnll.linear_sequence_nll(h, w, y, m, bias=b, **kw)
    if entry in ("loss", "loss_sums"):
      loss, sums = jaxnll.linear_nll_loss(h, w, y, m, bias=b, normalize="sum", **kw)
      # "loss": the scalar, spread evenly (the test's cotangents are then all 1).
      return sums if entry == "loss_sums" else jnp.broadcast_to(loss / h.shape[0], sums.shape)
    if entry == "token":
      return jaxnll.linear_token_nll(h, w, y, m, bias=b, **kw).sum(-1)
    if entry == "segment":
      return jaxnll.linear_segment_nll(h, w, y, m, seg, num_segments=2, bias=b, **kw).sum(-1)
    z = jnp.einsum("btd,dv->btv", h, w, precision="highest") + b  # "logits"
    return jaxnll.sequence_nll(z, y, m, vocab_axis="model", vocab_size=40)

  return local


USER_ENTRIES = [
  ("handwritten", None),
  ("sequence", "chunked"),
  ("sequence", "token_chunked"),
  ("sequence", "xla"),
  ("loss", "chunked"),
  ("loss", "token_chunked"),
  ("loss_sums", "chunked"),
  ("token", "chunked"),
  ("segment", "token_chunked"),
  ("logits", None),
]


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("entry,implementation", USER_ENTRIES)
def test_user_shard_map_exact_with_and_without_check_vma(entry, implementation, check_vma):
  """Inside the caller's own ``shard_map`` under ``jax.jit``: values and the gradients of
  hidden, weight and bias equal the unsharded ones on 8 devices.  With ``check_vma=False``
  JAX hands each shard ``1/8`` of a replicated result's cotangent (and sums the shards'
  replicated-input cotangents); the weight gradient was 1/8 of the true one there."""
  mesh = parallel.make_mesh("model=8")
  h, w, b, y, m = make(seed=5, v=40)
  seg = jnp.where(jnp.arange(6) < 3, 1, 2)[None, :].repeat(4, 0)
  sharded = jax.shard_map(
    _user_entry(entry, implementation),
    mesh=mesh,
    in_specs=(P(), P(None, "model"), P("model"), P(), P(), P()),
    out_specs=P(),
    check_vma=check_vma,
  )
  # A different cotangent per sample (the scalar loss: the same for all).
  weights = jnp.ones(4) if entry == "loss" else jnp.arange(1.0, 5.0)
  f = lambda fn: jax.jit(
    jax.value_and_grad(lambda h, w, b: fn(h, w, b, y, m, seg) @ weights, argnums=(0, 1, 2))
  )
  want = f(lambda h, w, b, y, m, seg: reference.sequence_nll(ref_logits(h, w, b), y, m))(h, w, b)
  assert_close(f(sharded)(h, w, b), want)


@pytest.mark.parametrize("check_vma", [True, False])
def test_user_shard_map_runs_eagerly(check_vma):
  """The same body without ``jax.jit``: an eager ``shard_map`` ran each operation on its own
  and raised ``NotImplementedError`` (custom_vjp symbolic zeros) at the fused entries."""
  mesh = parallel.make_mesh("model=8")
  h, w, b, y, m = make(seed=5, v=40)
  seg = jnp.ones((4, 6), int)
  outs = []
  for entry, impl in (("loss", "chunked"), ("sequence", "token_chunked")):
    sharded = jax.shard_map(
      _user_entry(entry, impl),
      mesh=mesh,
      in_specs=(P(), P(None, "model"), P("model"), P(), P(), P()),
      out_specs=P(),
      check_vma=check_vma,
    )
    outs.append(sharded(h, w, b, y, m, seg).sum())
    grads = jax.grad(lambda h, w, b, f=sharded: f(h, w, b, y, m, seg).sum(), argnums=(0, 1, 2))
    outs.append(grads(h, w, b))
  want = reference.sequence_nll(ref_logits(h, w, b), y, m).sum()
  want_grads = jax.grad(
    lambda h, w, b: reference.sequence_nll(ref_logits(h, w, b), y, m).sum(), argnums=(0, 1, 2)
  )(h, w, b)
  assert_close(outs, [want, want_grads] * 2)


def test_user_shard_map_data_and_model_axes_without_check_vma():
  """``data=2, model=4`` with ``check_vma=False``: the caller sums the batch shards' losses
  with ``psum`` (its own); the weight is split over ``model`` only."""
  mesh = parallel.make_mesh("data=2,model=4")
  h, w, b, y, m = make(seed=6, v=40)

  def local(h, w, b, y, m):
    loss, _ = jaxnll.linear_nll_loss(
      h, w, y, m, bias=b, normalize="sum", vocab_axis="model", vocab_size=40
    )
    return jax.lax.psum(loss, "data")

  sharded = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(P("data"), P(None, "model"), P("model"), P("data"), P("data")),
    out_specs=P(),
    check_vma=False,
  )
  f = lambda fn: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
  want = f(lambda h, w, b: reference.sequence_nll(ref_logits(h, w, b), y, m).sum())(h, w, b)
  assert_close(f(lambda h, w, b: sharded(h, w, b, y, m))(h, w, b), want)


def test_int64_numpy_ids_beyond_int32_never_wrap_in_the_mesh_entries():
  """x64 off: an int64 NumPy id ``2**32 + 3`` reached the ``shard_map`` through ``jit``,
  which narrowed it to the valid id ``3``; it is out of range, so its sample is NaN."""
  assert not jax.config.jax_enable_x64
  mesh = parallel.make_mesh("data=2,model=4")
  h, w, b, y, m = make(seed=7, v=40)
  m = m.at[0, 2].set(True)
  bad = np.asarray(y, np.int64)
  bad[0, 2] = 2**32 + 3
  got = parallel.linear_sequence_nll(h, w, bad, m, mesh=mesh, bias=b)
  logits_got = parallel.sequence_nll(ref_logits(h, w, b), bad, m, mesh=mesh)
  want = reference.sequence_nll(ref_logits(h, w, b), y, m)
  for out in (got, logits_got):
    assert np.isnan(out[0]) and np.isfinite(out[1:]).all()
    assert_close(out[1:], want[1:])
