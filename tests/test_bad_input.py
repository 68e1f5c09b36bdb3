"""Bad and degenerate input against every public entry: one table of calls and what they must do.

Each row of ``TABLE`` is ``(callable, args, kwargs, expected, fragment)``: the call must raise
``expected`` with a message containing ``fragment`` (trace-time ``ValueError`` / ``TypeError``
naming the argument, or ``checkify.JaxRuntimeError`` naming the position, from
:func:`jaxnll.checked`), or, with ``expected=None``, return finite results.  Run-time values
that are not errors (a target outside ``[0, V)``, NaN at a context position) are the
gradient tables below: the sample's loss and the gradient that flows from it are NaN, every
other gradient is clean.  The x64 tests run every entry under ``jax.enable_x64``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxnll
from jaxnll import distill, fused, nll

B, T, V, D = 2, 3, 5, 4
KEY = jax.random.split(jax.random.key(0), 4)
L = jax.random.normal(KEY[0], (B, T, V))  # logits
Y = jnp.array([[1, 2, 3], [4, 0, 1]])  # targets
M = jnp.array([[False, True, True], [True, True, False]])  # span
H = jax.random.normal(KEY[1], (B, T, D))  # hidden
W = jax.random.normal(KEY[2], (D, V)) / 2  # head weight
S = jnp.array([[1, 1, 2], [1, 0, 0]])  # segment ids
NAN, INF = float("nan"), float("inf")

seq = jaxnll.sequence_nll
tok = jaxnll.token_nll
sel = jaxnll.selective_sequence_nll
seg = functools.partial(jaxnll.segment_nll, num_segments=2)
lin = jaxnll.linear_sequence_nll
linloss = jaxnll.linear_nll_loss
linseg = functools.partial(jaxnll.linear_segment_nll, num_segments=2)
lintok = jaxnll.linear_token_nll
dist = jaxnll.distill_cross_entropy
segdist = functools.partial(distill.segment_distill_cross_entropy, num_segments=2)
safe = jaxnll.checked

LOGITS_ENTRIES = [  # (callable, the arrays it takes)
  (tok, (L, Y)),
  (seq, (L, Y, M)),
  (sel, (L, Y, M)),
  (seg, (L, Y, M, S)),
]
FUSED_ENTRIES = [(lin, (H, W, Y, M)), (linloss, (H, W, Y, M)), (lintok, (H, W, Y, M))]
TOKEN_OPTION_ENTRIES = LOGITS_ENTRIES[:2] + FUSED_ENTRIES

BAD_OPTIONS = [  # (option, value, exception, fragment)
  ("z_loss", NAN, ValueError, "z_loss must be a finite float in [0, inf), got nan"),
  ("z_loss", INF, ValueError, "z_loss must be a finite float in [0, inf), got inf"),
  ("z_loss", -1e-4, ValueError, "z_loss must be a finite float in [0, inf), got -0.0001"),
  ("z_loss", "0.1", TypeError, "z_loss must be a Python float, got str"),
  ("label_smoothing", -0.1, ValueError, "label_smoothing must be a finite float in [0, 1]"),
  ("label_smoothing", 1.5, ValueError, "label_smoothing must be a finite float in [0, 1], got 1.5"),
  ("label_smoothing", NAN, ValueError, "label_smoothing must be a finite float in [0, 1], got nan"),
  ("logit_softcap", INF, ValueError, "logit_softcap must be a finite float in (0, inf), got inf"),
  ("logit_softcap", 0.0, ValueError, "logit_softcap must be a finite float in (0, inf), got 0.0"),
  ("logit_softcap", -30.0, ValueError, "logit_softcap must be a finite float in (0, inf)"),
  ("logit_softcap", NAN, ValueError, "logit_softcap must be a finite float in (0, inf), got nan"),
  ("logit_softcap", True, TypeError, "logit_softcap must be a Python float or None, got bool"),
  ("vocab_size", 0, ValueError, "vocab_size must be a positive Python int, got 0"),
  ("vocab_size", 9, ValueError, "vocab_size 9 is larger than the 5 vocabulary columns"),
]
BAD_TEMPERATURES = [
  (0.0, ValueError, "temperature must be a finite float in [1e-06, inf), got 0.0"),
  (-1.0, ValueError, "temperature must be a finite float in [1e-06, inf), got -1.0"),
  (NAN, ValueError, "temperature must be a finite float in [1e-06, inf), got nan"),
  (INF, ValueError, "temperature must be a finite float in [1e-06, inf), got inf"),
  (1e-30, ValueError, "temperature must be a finite float in [1e-06, inf), got 1e-30"),
  (True, TypeError, "temperature must be a Python float, got bool"),
  (jnp.array(2.0), TypeError, "temperature must be a Python float, got ArrayImpl"),
]


def _replace(args, k, value):
  return args[:k] + (value,) + args[k + 1 :]


def _rows():
  rows = []
  add = rows.append

  # -- from logits: dtypes, ranks, shapes, V = 0, lists
  for fn, args in LOGITS_ENTRIES:
    add((fn, _replace(args, 0, Y), {}, TypeError, "logits must be a floating array"))
    add((fn, _replace(args, 1, L[..., 0]), {}, TypeError, "targets must be an integer array"))
    add((fn, _replace(args, 1, Y[:, :2]), {}, ValueError, "targets must have the shape of logits"))
    add((fn, _replace(args, 0, L[..., :0]), {}, ValueError, "logits must have a vocabulary axis"))
    add((fn, jax.tree.map(np.asarray, args), {}, None, None))  # NumPy arrays work
    add((fn, jax.tree.map(lambda x: np.asarray(x).tolist(), args), {}, None, None))  # lists too
    add((fn, _replace(args, 0, [[[0.0, 1.0]], [[0.0]]]), {}, TypeError, "logits must be an array"))
  for fn, args in LOGITS_ENTRIES[1:]:
    add(
      (
        fn,
        _replace(args, 0, L[0]),
        {},
        ValueError,
        "logits must have shape [B, T, V], got shape (3, 5)",
      )
    )
    add((fn, _replace(args, 2, M.astype(int)), {}, TypeError, "span_mask must be a bool mask"))
    add(
      (fn, _replace(args, 2, M[:, :2]), {}, ValueError, "span_mask must have the shape of targets")
    )
    add((fn, args, dict(reduction="avg"), ValueError, "reduction must be one of ('sum', 'mean')"))
    add((fn, args, dict(reduction=None), ValueError, "reduction must be one of ('sum', 'mean')"))
    add((fn, args, dict(z_los=0.1), TypeError, "unexpected keyword argument 'z_los'"))
  add((sel, (L, Y, M, M[:1]), {}, ValueError, "valid_mask must have the shape of targets"))
  add((sel, (L, Y, M, M.astype(int)), {}, TypeError, "valid_mask must be a bool mask"))
  add((seg, (L, Y, M, S.astype(float)), {}, TypeError, "segment_ids must be an integer array"))
  add((seg, (L, Y, M, S[:1]), {}, ValueError, "segment_ids must have the shape of targets"))
  add((jaxnll.segment_nll, (L, Y, M, S), dict(num_segments=0), ValueError, "num_segments must"))

  # -- option domains, in every entry that takes them
  for fn, args in TOKEN_OPTION_ENTRIES:
    for name, value, error, fragment in BAD_OPTIONS:
      add((fn, args, {name: value}, error, fragment))
    add((fn, args, dict(label_smoothing=1.0), None, None))  # 1 is allowed: uniform target
  for fn, args in [(dist, (L, L, M)), (segdist, (L, L, M, S))]:
    for value, error, fragment in BAD_TEMPERATURES:
      add((fn, args, dict(temperature=value), error, fragment))
    add((fn, args, dict(temperature=1e-6), None, None))  # the smallest one allowed
    add((fn, args, dict(kind="js"), ValueError, "kind must be one of ('cross_entropy', 'kl')"))
    add((fn, args, dict(reduction="avg"), ValueError, "reduction must be one of ('sum', 'mean')"))

  # -- batch reduction
  sums, counts = jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0])
  for fn in (jaxnll.batch_loss, jaxnll.loss_terms, nll.finish_loss):
    add((fn, (sums, counts), dict(normalize="mean"), ValueError, "one of ('tokens', 'samples',"))
  add((jaxnll.batch_loss, (sums, counts[:1]), {}, ValueError, "sums and counts must have the same"))
  add((jaxnll.batch_loss, ([1.0, 2.0], [1.0, 1.0]), {}, None, None))

  # -- fused
  for fn, args in FUSED_ENTRIES:
    add((fn, _replace(args, 0, Y), {}, TypeError, "hidden must be a floating array"))
    add((fn, _replace(args, 1, W.astype(int)), {}, TypeError, "weight must be a floating array"))
    add((fn, _replace(args, 2, Y.astype(float)), {}, TypeError, "targets must be an integer"))
    add((fn, _replace(args, 3, M.astype(int)), {}, TypeError, "span_mask must be a bool mask"))
    add(
      (
        fn,
        _replace(args, 0, H[0]),
        {},
        ValueError,
        "hidden must have shape [B, T, D], got shape (3, 4)",
      )
    )
    add((fn, _replace(args, 1, W[None]), {}, ValueError, "weight must have shape [D, V]"))
    add((fn, _replace(args, 1, W[:3]), {}, ValueError, "weight must have shape [D, V] with D ="))
    add(
      (fn, _replace(args, 2, Y[:, :2]), {}, ValueError, "targets must have shape [B, T] = (2, 3)")
    )
    add((fn, _replace(args, 3, M[:1]), {}, ValueError, "span_mask must have shape [B, T] = (2, 3)"))
    add((fn, _replace(args, 1, W[:, :0]), {}, ValueError, "weight must have a vocabulary axis"))
    add((fn, args, dict(bias=jnp.zeros(V + 1)), ValueError, "bias must have shape [V] = (5,)"))
    add((fn, args, dict(bias=jnp.zeros(V, int)), TypeError, "bias must be a floating array"))
    add((fn, args, dict(implementation="pallas"), ValueError, "one of ('auto', 'chunked', 'tok"))
    add((fn, args, dict(token_chunk=0), ValueError, "token_chunk must be a positive Python int"))
    add((fn, args, dict(vocab_chunk=2.0), ValueError, "vocab_chunk must be a positive Python int"))
    add((fn, jax.tree.map(lambda x: np.asarray(x).tolist(), args), {}, None, None))
  add((lin, FUSED_ENTRIES[0][1], dict(reduction="tokens"), ValueError, "one of ('sum', 'mean')"))
  # The segment entry: the same checks of the arrays it shares with the others.
  add((linseg, (H, W, Y, M, S), {}, None, None))
  add((linseg, (H, W[:3], Y, M, S), {}, ValueError, "weight must have shape [D, V] with D ="))
  add((linseg, (H, W, Y, M, S), dict(implementation="pallas"), ValueError, "one of ('auto'"))
  add((lintok, (H, W, Y, M), dict(return_entropy=1), TypeError, "return_entropy must be a Python"))
  add((lintok, (H, W, Y, M), dict(temperature=0.0), ValueError, "temperature must be"))
  add((linloss, FUSED_ENTRIES[1][1], dict(normalize="mean"), ValueError, "one of ('tokens', '"))
  add((linloss, FUSED_ENTRIES[1][1], dict(schedule="fast"), ValueError, "schedule must be one"))

  # -- distillation
  for fn, args in [(dist, (L, L, M)), (segdist, (L, L, M, S))]:
    add((fn, _replace(args, 0, Y), {}, TypeError, "student_logits must be a floating array"))
    add((fn, _replace(args, 1, Y), {}, TypeError, "teacher_logits must be a floating array"))
    add((fn, _replace(args, 0, L[0]), {}, ValueError, "student_logits must have shape [B, T, V]"))
    add((fn, _replace(args, 1, L[..., :4]), {}, ValueError, "must have the same shape"))
    add((fn, _replace(args, 2, M[:, :1]), {}, ValueError, "span_mask must have the shape [B, T]"))
    add((fn, (L[..., :0], L[..., :0]) + args[2:], {}, ValueError, "student_logits must have a voc"))
    add((fn, jax.tree.map(lambda x: np.asarray(x).tolist(), args), {}, None, None))

  # -- spans
  add((jaxnll.shift_targets, (Y.astype(float), M), {}, TypeError, "tokens must be an integer"))
  add((jaxnll.shift_targets, (Y, M[:, :2]), {}, ValueError, "tokens and span_mask must have the"))
  add((jaxnll.shift_targets, (Y, M, S[:1]), {}, ValueError, "tokens and segment_ids must have"))
  add((jaxnll.shift_targets, ([1, 2, 3], [False, True, True]), {}, None, None))
  add((jaxnll.concat_sample, (Y, Y[:1]), {}, ValueError, "x_ids and y_ids must be [..., Tx]"))
  add((jaxnll.concat_sample, ([1.0], [2]), {}, TypeError, "x_ids must be an integer array"))
  add((jaxnll.spans_to_mask, (Y[:, 0], Y[:, 1]), dict(length=-1), ValueError, "length must be"))
  add((jaxnll.spans_to_mask, (Y[:, 0], Y[:1, 1], 4), {}, ValueError, "starts and ends must have"))
  add((jaxnll.from_ignore_index, (L,), {}, TypeError, "labels must be an integer array"))
  add((jaxnll.from_ignore_index, ([-100, 3],), {}, None, None))
  add((jaxnll.stop_gradient_outside, (H, M[:1]), {}, ValueError, "span_mask must match the lead"))
  add((jaxnll.pack_samples, ([([1, 2, 3], [0, 1, 1])], 2), {}, ValueError, "sample 0 has 3 tok"))

  # -- run-time values under jaxnll.checked: named positions, for every kind of loss
  err = checkify.JaxRuntimeError
  bad_y = Y.at[1, 1].set(V)
  add((safe(seq), (L, bad_y, M), {}, err, "targets hold 5 at [1, 1] (flat position 4) inside"))
  add((safe(tok), (L, Y.at[0, 2].set(-1)), {}, err, "targets hold -1 at [0, 2] (flat position 2)"))
  add((safe(seq), (L, Y.at[0, 0].set(-100), M), {}, None, None))  # outside the span: fine
  add((safe(seq), (L.at[0, 1, 3].set(NAN), Y, M), {}, err, "logits hold NaN or +inf at [0, 1]"))
  add((safe(seq), (L.at[1, 0, 0].set(INF), Y, M), {}, err, "logits hold NaN or +inf at [1, 0]"))
  add((safe(seq), (L.at[0, 0].set(NAN), Y, M), {}, None, None))
  masked = L.at[..., 0].set(-INF).at[0, 1, 0].set(0.0)  # -inf masks id 0 (not a target)
  add((safe(seq), (masked, Y.at[1, 1].set(3), M), {}, None, None))
  add((safe(seq), (masked, Y, M), {}, err, "logits are -inf at the target id at [1, 1]"))
  add((safe(seq), (masked, Y.at[1, 1].set(3), M), dict(logit_softcap=5.0), None, None))
  add(
    (safe(seq), (masked, Y.at[1, 1].set(3), M), dict(label_smoothing=0.1), err, "with label_smoo")
  )
  add((safe(seq), (L, Y.at[0, 1].set(4), M), dict(vocab_size=4), err, "a padding column"))
  add((safe(seq), (L, Y.at[0, 1].set(4), M), dict(vocab_size=4), err, "(vocab_size=4 of 5"))
  add((safe(seq), (L.at[0, 0].set(NAN), Y.at[1, 0].set(3), M), dict(vocab_size=4), None, None))
  add((safe(seq), (L.at[..., 4].set(NAN), Y.at[1, 0].set(3), M), dict(vocab_size=4), None, None))
  add((safe(sel), (L.at[0, 0, 1].set(NAN), Y, M), {}, err, "logits hold NaN or +inf at [0, 0]"))
  add((safe(sel), (L.at[0, 0, 1].set(NAN), Y, M, M), {}, None, None))  # not in valid_mask
  add((safe(sel), (L.at[0, 0, 1].set(NAN), Y, M), dict(valid_mask=M), None, None))
  add((safe(seg), (L, Y.at[0, 2].set(9), M, S), {}, err, "targets hold 9 at [0, 2]"))
  add((safe(seg), (L, Y.at[1, 1].set(9), M, S), {}, None, None))  # segment 0 is padding
  add((safe(seq), (L.at[0, 1].set(1e30), Y, M), dict(z_loss=1.0), err, "result 0 of the loss"))
  add((safe(lambda x, t, m: seq(x, t, m).sum()), (L, bad_y, M), {}, err, "targets hold 5 at [1"))
  for fn in (lin, linloss):
    add((safe(fn), (H, W, bad_y, M), {}, err, "targets hold 5 at [1, 1] (flat position 4)"))
    add((safe(fn), (H, W, Y.at[0, 1].set(4), M), dict(vocab_size=4), err, "a padding column"))
    add((safe(fn), (H.at[0, 2, 1].set(NAN), W, Y, M), {}, err, "hidden is not finite at [0, 2]"))
    add((safe(fn), (H.at[0, 0].set(NAN), W, Y.at[0, 0].set(-100), M), {}, None, None))
    add((safe(fn), (H, W.at[1, 2].set(INF), Y, M), {}, err, "weight is not finite at [d, v] ="))
    bias = jnp.zeros(V).at[0].set(-INF)  # masks id 0, not a target
    add((safe(fn), (H, W, Y.at[1, 1].set(3), M), dict(bias=bias), None, None))
    add((safe(fn), (H, W, Y, M), dict(bias=bias), err, "bias are -inf at the target id at [1, 1]"))
    add((safe(fn), (H, W, Y, M), dict(bias=bias.at[2].set(NAN)), err, "bias hold NaN or +inf"))
    add((safe(fn), (H, W, Y, M), dict(implementation="xla"), None, None))
  add((safe(dist), (L, L.at[1, 0, 2].set(NAN), M), {}, err, "teacher_logits hold NaN or +inf at"))
  add((safe(dist), (L, L.at[0, 1].set(-INF), M), {}, err, "teacher_logits are all -inf at [0, 1]"))
  add((safe(dist), (L.at[..., 0].set(-INF), L.at[..., 0].set(-INF), M), {}, None, None))
  add((safe(dist), (L.at[0, 1, 0].set(-INF), L, M), {}, err, "student_logits are -inf where"))
  add((safe(segdist), (L.at[1, 1].set(NAN), L, M, S), {}, None, None))  # segment 0
  add((safe(segdist), (L.at[0, 2].set(NAN), L, M, S), {}, err, "student_logits hold NaN or +inf"))
  return rows


TABLE = _rows()


def _name(row):
  fn = row[0]
  fn = getattr(fn, "func", fn)
  return getattr(fn, "__name__", "fn")


@pytest.mark.parametrize("row", TABLE, ids=[f"{k}-{_name(r)}" for k, r in enumerate(TABLE)])
def test_table(row):
  fn, args, kwargs, expected, fragment = row
  if expected is None:
    out = fn(*args, **kwargs)
    for leaf in jax.tree.leaves(out):
      assert np.all(np.isfinite(np.asarray(leaf))), (out, row)
  else:
    with pytest.raises(expected) as info:
      fn(*args, **kwargs)
    assert fragment in str(info.value), str(info.value)


#: Public entries whose bad input is tabled in their own test module.
COVERED_ELSEWHERE = {
  "dpo_loss": "test_preference",
  "simpo_loss": "test_preference",
  "orpo_loss": "test_preference",
  "preference_metrics": "test_preference",
  "ppo_clip_loss": "test_policy",
  "group_advantages": "test_policy",
  "k3_kl": "test_policy",
  "policy_loss_terms": "test_policy",
  "linear_distill_loss": "test_fused_distill",
}


def _name(fn) -> str | None:
  # Run-time shape checking wraps functions: compare the functions by name.
  for candidate in (fn, getattr(fn, "__wrapped__", None), getattr(fn, "func", None)):
    name = getattr(candidate, "__name__", None)
    if name is not None:
      return name
  return None


def test_the_table_covers_every_public_entry():
  covered = {_name(r[0]) for r in TABLE}
  covered |= {_name(getattr(r[0], "__wrapped__", None)) for r in TABLE}
  public = {n for n in dir(jaxnll) if callable(getattr(jaxnll, n)) and not n.startswith("_")}
  public.discard("checked")  # it wraps the others in the table
  assert public <= covered | set(COVERED_ELSEWHERE), public - covered - set(COVERED_ELSEWHERE)


# ----------------------------------------------------------------------------- one wrapper


def test_one_checked_wrapper_and_the_check_helpers_stay_importable():
  from jaxnll import checks

  assert jaxnll.checked is checks.checked
  for module in (nll, distill, fused):
    assert not hasattr(module, "checked")
  assert nll.check_inputs is checks.check_logits_inputs
  assert fused.check_inputs is checks.check_fused_inputs
  assert distill.check_inputs is checks.check_distill_inputs


def test_check_helpers_under_the_users_own_jit():
  f = jax.jit(checkify.checkify(lambda *a: (nll.check_inputs(*a), seq(*a))[1]))
  err, _ = f(L, Y.at[0, 1].set(-3), M)
  with pytest.raises(checkify.JaxRuntimeError, match=r"targets hold -3 at \[0, 1\]"):
    err.throw()
  err, out = f(L, Y, M)
  err.throw()
  np.testing.assert_allclose(out, seq(L, Y, M))


# ----------------------------------------------------------------------------- bad target ids


def _per_sample_entries():
  """(name, fn(x, targets) -> f32[B], x): every entry as per-sample losses of its input."""
  return [
    ("token_nll", lambda x, y: jnp.sum(jnp.where(M, tok(x, y), 0.0), axis=1), L),
    ("sequence_nll", lambda x, y: seq(x, y, M), L),
    ("sequence_nll_mean_z", lambda x, y: seq(x, y, M, reduction="mean", z_loss=1e-2), L),
    ("selective", lambda x, y: sel(x, y, M), L),
    ("segment_nll", lambda x, y: seg(x, y, M, S).sum(axis=1), L),
    ("vocab_size", lambda x, y: seq(x, y.at[1, 0].set(3), M, vocab_size=4), L),
    ("linear_chunked", lambda h, y: lin(h, W, y, M, token_chunk=2, vocab_chunk=2), H),
    ("linear_xla", lambda h, y: lin(h, W, y, M, implementation="xla"), H),
    ("linear_nll_loss_sums", lambda h, y: linloss(h, W, y, M, token_chunk=2)[1], H),
  ]


@pytest.mark.parametrize("entry", _per_sample_entries(), ids=lambda e: e[0])
@pytest.mark.parametrize("bad", [V, -1, 4_000_000_000], ids=["V", "-1", "4e9"])
def test_bad_target_makes_that_samples_loss_and_gradient_nan_and_nothing_else(entry, bad):
  _, fn, x = entry
  bad = min(bad, 4) if entry[0] == "vocab_size" and bad == V else bad  # a padding column
  # 4e9 does not fit an int32: uint32 ids (int64 ones are the x64 tests').
  y = jnp.asarray(Y, jnp.uint32 if bad >= 2**31 else jnp.int32).at[0, 1].set(bad)
  out = fn(x, y)
  assert np.isnan(out[0]) and np.isfinite(out[1])
  grad = lambda ct: jax.grad(lambda x: jnp.vdot(fn(x, y), ct))(x)  # noqa: E731
  g0, g1, g_zero = grad(jnp.array([1.0, 0.0])), grad(jnp.array([0.0, 1.0])), grad(jnp.zeros(2))
  assert np.isnan(np.asarray(g0)).any()  # the bad sample's gradient is loud
  clean = jax.grad(lambda x: fn(x, jnp.asarray(Y, y.dtype))[1])(x)
  np.testing.assert_allclose(g1, clean, rtol=1e-6, atol=1e-7)  # the other one is untouched
  assert np.all(np.asarray(g_zero) == 0)  # a zero cotangent sends back exactly nothing


@pytest.mark.parametrize("schedule", ["one_pass", "two_pass"])
def test_linear_nll_loss_gradient_is_nan_for_a_bad_target(schedule):
  bad = Y.at[0, 1].set(V)
  grads = jax.grad(
    lambda h, w: linloss(h, w, bad, M, schedule=schedule, token_chunk=2)[0], argnums=(0, 1)
  )(H, W)
  assert all(np.isnan(np.asarray(g)).any() for g in grads)


# ----------------------------------------------------------------------------- non-finite logits


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_selective_non_finite_context_never_reaches_the_gradient(value):
  ctx = L.at[0, 0].set(value).at[1, 2, 1].set(value)  # context positions (outside the span)
  valid = M.at[0, 0].set(True)  # [0, 0] reported by the value, [1, 2] by nothing
  clean = jax.grad(lambda x: sel(x, Y, M, valid).sum())(L)
  for v in (None, valid):
    g = jax.grad(lambda x: sel(x, Y, M, v).sum())(ctx)  # noqa: B023
    np.testing.assert_allclose(g, clean, rtol=1e-6, atol=1e-7)
  # Value: over valid_mask it reports position [0, 0] (NaN there for NaN / inf logits);
  # position [1, 2] (outside both masks) reaches nothing.
  out = sel(ctx, Y, M, valid)
  assert np.isfinite(out[1]) and out[1] == sel(L, Y, M, valid)[1]
  assert not np.isfinite(out[0])
  np.testing.assert_allclose(sel(ctx, Y, M, M), sel(L, Y, M, M), rtol=1e-6)


@pytest.mark.parametrize("entry", ["sequence_nll", "distill"])
def test_nan_in_a_span_with_zero_cotangent_leaks_nothing(entry):
  bad = L.at[0, 1, 2].set(NAN)
  fn = (lambda x: seq(x, Y, M)) if entry == "sequence_nll" else (lambda x: dist(x, L, M))
  assert np.isnan(fn(bad)[0]) and np.isfinite(fn(bad)[1])
  g = jax.grad(lambda x: jnp.vdot(fn(x), jnp.array([0.0, 1.0])))(bad)
  np.testing.assert_allclose(g, jax.grad(lambda x: fn(x)[1])(L), rtol=1e-6, atol=1e-7)
  assert np.isnan(np.asarray(jax.grad(lambda x: fn(x)[0])(bad))).any()


# ----------------------------------------------------------------------------- degenerate shapes


def test_shift_targets_on_empty_rows_returns_empty_rows():
  for shape in [(0,), (2, 0), (0, 5)]:
    targets, mask = jaxnll.shift_targets(jnp.zeros(shape, int), jnp.zeros(shape, bool))
    assert targets.shape == shape and mask.shape == shape
  targets, mask = jaxnll.shift_targets(jnp.ones((2, 0), int), jnp.ones((2, 0), bool), S[:, :0])
  assert targets.shape == (2, 0)


def test_logits_entries_accept_empty_batches_and_rows():
  for b, t in [(0, 3), (2, 0)]:
    x, y, m = jnp.zeros((b, t, V)), jnp.zeros((b, t), int), jnp.ones((b, t), bool)
    for fn in (seq, sel, lambda *a: dist(a[0], a[0], a[2])):
      out, g = jax.value_and_grad(lambda x: fn(x, y, m).sum())(x)  # noqa: B023
      assert out == 0 and g.shape == x.shape
    assert seg(x, y, m, y).shape == (b, 2)


# ----------------------------------------------------------------------------- x64


def _x64_calls():
  h, w, x = (jnp.asarray(np.asarray(a), jnp.float32) for a in (H, W, L))
  return [
    ("token_nll", lambda x, y: tok(x, y).sum(), x),
    ("sequence_nll", lambda x, y: seq(x, y, M).sum(), x),
    ("selective", lambda x, y: sel(x, y, M).sum(), x),
    ("segment_nll", lambda x, y: seg(x, y, M, S).sum(), x),
    ("distill", lambda x, y: dist(x, x * 2, M).sum(), x),
    ("linear_sequence_nll", lambda h, y: lin(h, w, y, M, token_chunk=2, vocab_chunk=2).sum(), h),
    ("linear_xla", lambda h, y: lin(h, w, y, M, implementation="xla").sum(), h),
    ("linear_reference", lambda h, y: lin(h, w, y, M, implementation="reference").sum(), h),
    ("linear_nll_loss_1", lambda h, y: linloss(h, w, y, M, token_chunk=2, vocab_chunk=2)[0], h),
    (
      "linear_nll_loss_2",
      lambda h, y: linloss(h, w, y, M, schedule="two_pass", token_chunk=2)[0],
      h,
    ),
    ("shift_targets", lambda x, y: jnp.sum(jaxnll.shift_targets(y, M, y)[0] * x[..., 0]), x),
  ]


@pytest.mark.parametrize("k", range(11))
def test_every_entry_traces_and_matches_under_x64(k):
  name, fn, x = _x64_calls()[k]
  want = jax.jit(jax.value_and_grad(fn))(x, jnp.asarray(Y))
  with jax.enable_x64(True):
    name, fn, x = _x64_calls()[k]
    y64 = jnp.asarray(np.asarray(Y), jnp.int64)
    assert y64.dtype == jnp.int64
    got = jax.jit(jax.value_and_grad(fn))(x, y64)
    assert got[1].dtype == jnp.float32, name
    if name not in ("shift_targets", "distill"):
      bad = y64.at[0, 1].set(2**32 + int(Y[0, 1]))  # wraps to a valid id if narrowed first
      assert np.isnan(jax.jit(fn)(x, bad)), name
      if "reference" not in name:
        assert np.isnan(np.asarray(jax.jit(jax.grad(fn))(x, bad))).any(), name
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_checked_names_an_int64_id_past_two_to_the_32():
  with jax.enable_x64(True):
    y = jnp.asarray(np.asarray(Y), jnp.int64).at[1, 0].set(2**32 + 1)
    with pytest.raises(checkify.JaxRuntimeError, match=r"targets hold 4294967297 at \[1, 0\]"):
      safe(seq)(L, y, M)


# ----------------------------------------------------------------------------- checked in a trace


@pytest.mark.parametrize("how", ["jit", "jit_grad", "jit_vmap"])
def test_checked_inside_jit_fails_with_one_line_saying_to_call_it_outside(how):
  f = safe(seq)
  call = {
    "jit": lambda: jax.jit(f)(L, Y, M),
    "jit_grad": lambda: jax.jit(jax.grad(lambda x: f(x, Y, M).sum()))(L),
    "jit_vmap": lambda: jax.jit(jax.vmap(lambda x: f(x[None], Y[:1], M[:1])))(L),
  }[how]
  with pytest.raises(RuntimeError, match=r"checked\(sequence_nll\).*call it outside jit") as e:
    call()
  assert "\n" not in str(e.value)


def test_checked_under_jit_still_names_a_bad_argument():
  with pytest.raises(ValueError, match="span_mask"):
    jax.jit(safe(seq))(L, Y, M[:, :2])


def test_checked_under_eager_grad_and_vmap_still_checks():
  g = jax.grad(lambda x: safe(seq)(x, Y, M).sum())(L)
  np.testing.assert_allclose(g, jax.grad(lambda x: seq(x, Y, M).sum())(L), rtol=1e-6)
  with pytest.raises(checkify.JaxRuntimeError, match="targets hold 7"):
    jax.grad(lambda x: safe(seq)(x, Y.at[0, 1].set(7), M).sum())(L)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_numpy_ids_past_int32_do_not_wrap_to_a_valid_id_with_x64_off(dtype):
  assert not jax.config.jax_enable_x64
  y = np.asarray(Y, dtype)
  y[0, 1] = 2**32 + 1  # would wrap to the valid id 1
  out = seq(L, y, M)
  assert np.isnan(out[0]) and out[1] == seq(L, Y, M)[1]
  assert np.isnan(tok(L, y)[0, 1])
  with pytest.raises(checkify.JaxRuntimeError, match=r"targets hold -1 at \[0, 1\]"):
    safe(seq)(L, y, M)
  y[0, 0] = 2**33  # outside the span: anything goes
  y[0, 1] = Y[0, 1]
  np.testing.assert_array_equal(safe(seq)(L, y, M), seq(L, Y, M))


# ----------------------------------------------------------------------------- one vocabulary


def test_every_module_words_a_bad_option_the_same_way():
  """One checking vocabulary (``jaxnll._core``): a float option given as a string is the same
  ``TypeError`` from the token options, the preference losses and the policy losses; a value
  outside its interval the same ``ValueError`` naming the interval."""
  x, t = jnp.ones(3), jnp.ones((1, 3))
  typed = {
    "z_loss": lambda: seq(L, Y, M, z_loss="0.1"),
    "beta": lambda: jaxnll.dpo_loss(x, x, x, x, beta="0.1"),
    "gamma": lambda: jaxnll.simpo_loss(x, x, x, x, gamma="0.1"),
    "clip_low": lambda: jaxnll.ppo_clip_loss(t, t, x[:1], t > 0, clip_low="0.1"),
    "constant": lambda: jaxnll.policy_loss_terms(x, x, normalize="sum", constant="0.1"),
  }
  for name, call in typed.items():
    with pytest.raises(TypeError, match=f"^{name} must be a Python float, got str '0.1'$"):
      call()
  ranged = {
    r"beta must be a finite float in \(0, inf\), got -1.0": lambda: jaxnll.orpo_loss(
      x, x, x, x, beta=-1.0
    ),
    r"label_smoothing must be a finite float in \[0, 0.5\), got 0.5": lambda: jaxnll.dpo_loss(
      x, x, x, x, label_smoothing=0.5
    ),
    r"clip_high must be a finite float in \[0, inf\), got -0.5": lambda: jaxnll.ppo_clip_loss(
      t, t, x[:1], t > 0, clip_high=-0.5
    ),
    r"label_smoothing must be a finite float in \[0, 1\], got 2.0": lambda: seq(
      L, Y, M, label_smoothing=2.0
    ),
  }
  for message, call in ranged.items():
    with pytest.raises(ValueError, match=f"^{message}$"):
      call()
  with pytest.raises(TypeError, match="^return_terms must be a Python bool"):
    jaxnll.orpo_loss(x, x, x, x, return_terms=1)
  with pytest.raises(TypeError, match="^group_size must be a Python int, got float 2.0$"):
    jaxnll.group_advantages(x, 2.0)
  with pytest.raises(ValueError, match="^kind must be one of"):
    jaxnll.dpo_loss(x, x, x, x, kind="kto")


def test_the_vocabulary_constants_live_in_core_only():
  from jaxnll import _core, policy

  assert nll.NORMALIZATIONS is _core.NORMALIZATIONS is policy.NORMALIZATIONS
  assert nll.REDUCTIONS is _core.REDUCTIONS and distill.REDUCTIONS is _core.REDUCTIONS
