# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The sub-sequence negative log-likelihood
#
# Supervised fine-tuning trains a language model on pairs: a context `x` (the prompt) and a
# target `y` (the response). The loss of one sample is the negative log-likelihood of the
# target given its context,
#
# $$L(x, y) = -\log \Pr_\theta(y \mid x) = -\sum_{t \in \mathrm{span}(y)} \log
# \mathrm{softmax}(\mathrm{logits}_t)[\mathrm{target}_t],$$
#
# computed on **one** sequence `[x, y]`: the whole sequence goes through the model, and only the
# positions that predict a token of `y` count.
#
# This notebook builds that loss step by step with `jaxnll` and measures the things that go
# wrong in practice:
#
# 1. the `[x, y]` sample, its span mask and the shifted targets;
# 2. per-token losses, and the sum against the mean (the book's numbers);
# 3. the per-sample loss (metric A) against the data-set aggregate (metric B);
# 4. two classic bugs: the off-by-one that drops the first target token, and averaging
#    averages under gradient accumulation;
# 5. the masked loss and the `stop_gradient` (selective) loss give the same gradients;
# 6. why the sample is `[x, y]` and not `[y, x]`.
#
# Everything runs on a CPU in well under a minute.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jaxnll
from jaxnll import nll
from jaxnll.train import data
from jaxnll.train.model import ModelConfig, make_model

start = time.time()
np.set_printoptions(precision=3, suppress=True)
print("jax", jax.__version__, "on", jax.devices()[0].platform)

# %% [markdown]
# ## 1. The sample `[x, y]` and its span mask
#
# `concat_sample` lays the context first and the target after, and marks the target with a
# boolean span mask. `shift_targets` turns the row into the coordinates every loss uses:
# `logits[t]` predicts `targets[t] = tokens[t + 1]`, and the loss mask says which of those
# predictions are of target tokens. The last context position predicts the **first** target
# token, so the loss mask starts one position *before* the span.

# %%
x_ids, y_ids = jnp.array([9, 4, 6, 1]), jnp.array([3, 9, 1])
tokens, span = jaxnll.concat_sample(x_ids, y_ids)
targets, loss_mask = jaxnll.shift_targets(tokens, span)
print("position ", np.arange(tokens.shape[0]))
print("tokens   ", np.asarray(tokens))
print("span     ", np.asarray(span, int))
print("targets  ", np.asarray(targets), " (the last position predicts nothing)")
print("loss mask", np.asarray(loss_mask, int))
assert int(loss_mask.sum()) == len(y_ids)  # every target token is predicted once

# %% [markdown]
# The same for a sample of the embedded fine-tuning data (one byte per token, special tokens
# for the roles). The assistant's text and its closing `EOS` form the span; the role token
# `ASSISTANT` is context, and it is the position that predicts the first byte of the answer.

# %%
heldout = data.embedded_examples("heldout")
example = heldout[1]
row, row_span = data.encode(example)
row_targets, row_mask = jaxnll.shift_targets(jnp.asarray(row), jnp.asarray(row_span))
print(repr(example.prompt), "->", repr(example.response))

names = {data.BOS: "BOS", data.EOS: "EOS", data.USER: "USR", data.ASSISTANT: "AST"}


def show(i):
  return names.get(int(i), chr(int(i)) if 32 <= int(i) < 127 else "?")


tail = slice(len(row) - 12, len(row))
fig, ax = plt.subplots(figsize=(9, 1.8))
grid = np.stack([row_span[tail], np.asarray(row_mask)[tail]]).astype(float)
ax.imshow(grid, cmap="Blues", vmin=0, vmax=1.6, aspect="auto")
for j, t in enumerate(range(tail.start, tail.stop)):
  ax.text(j, 0, show(row[t]), ha="center", va="center")
  nxt = show(row_targets[t]) if t < len(row) - 1 else "-"
  ax.text(j, 1, "→" + nxt, ha="center", va="center")
ax.set_yticks([0, 1], ["tokens (span shaded)", "prediction at t\n(loss mask shaded)"])
ax.set_xticks(range(12), [str(t) for t in range(tail.start, tail.stop)])
ax.set_xlabel("position t (last 12 of the row)")
ax.set_title("The loss mask is the span shifted left by one")
plt.show()

# %% [markdown]
# ## 2. Per-token losses, sum and mean
#
# `token_nll` is `logsumexp(logits) - logits[target]` at every position. A model that gives
# the right token probability 0.8 pays $-\log 0.8 = 0.223$ nats; one that gives it 0.2 pays
# $-\log 0.2 = 1.609$.

# %%
two = jnp.log(jnp.array([[0.8, 0.2], [0.8, 0.2]]))
print("-log 0.8, -log 0.2 =", np.asarray(jaxnll.token_nll(two, jnp.array([0, 1]))))

# %% [markdown]
# The book's example: a target of four tokens with per-step losses 0.1, 0.3, 0.2 and 0.4.
# The sequence loss `-log Pr(y | x)` is their **sum**, 1.0; the per-token **mean** is 0.25.
# Build logits that give exactly those per-step probabilities and let `sequence_nll` reduce
# them both ways:

# %%
steps = jnp.array([[0.1, 0.3, 0.2, 0.4]])
p = jnp.exp(-steps)  # Pr(target) at each step
book_logits = jnp.log(jnp.stack([p, 1 - p], axis=-1))  # [1, 4, 2]; target id 0 everywhere
book_targets, book_span = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)
per_token = jaxnll.token_nll(book_logits, book_targets)
total = jaxnll.sequence_nll(book_logits, book_targets, book_span)
mean = jaxnll.sequence_nll(book_logits, book_targets, book_span, reduction="mean")
print("per token", np.asarray(per_token[0]), " sum", float(total[0]), " mean", float(mean[0]))
assert np.isclose(total[0], 1.0) and np.isclose(mean[0], 0.25)

# %% [markdown]
# The sum is the log-likelihood of the whole target and grows with its length; the mean is a
# per-token rate that can be compared across targets of different lengths. Both are
# per-sample numbers. To see them on real data we need a model; a count-based **bigram model**
# fitted on the training split is enough (it is a real conditional distribution, it just
# looks at one token of context). Its logits are `log Pr(next | current)`.

# %%
train_samples = data.encode_all(data.embedded_examples("train"), data.MAX_LEN)
V = data.VOCAB_SIZE
counts = np.ones((V, V))  # add-one smoothing
for toks, _ in train_samples:
  np.add.at(counts, (toks[:-1], toks[1:]), 1.0)
bigram = jnp.asarray(np.log(counts / counts.sum(1, keepdims=True)), jnp.float32)

held_samples = data.encode_all(heldout, data.MAX_LEN)
batch = data.pad_batch(
  held_samples,
  range(len(held_samples)),
  rows=len(held_samples),
  length=max(len(t) for t, _ in held_samples),
)
b_tokens, b_span = jnp.asarray(batch["tokens"]), jnp.asarray(batch["span_mask"])
b_targets, b_mask = jaxnll.shift_targets(b_tokens, b_span)
b_logits = bigram[b_tokens]  # [B, T, V]
sums, n_tok = nll.sequence_nll_and_count(b_logits, b_targets, b_mask)
means = jaxnll.sequence_nll(b_logits, b_targets, b_mask, reduction="mean")
sums, n_tok, means = np.asarray(sums), np.asarray(n_tok), np.asarray(means)
print(f"{len(sums)} held-out samples, {int(n_tok.sum())} target tokens")

fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
ax[0].scatter(n_tok, sums, s=8)
ax[0].set(
  xlabel="target tokens |y|", ylabel="sum: -log Pr(y|x)  [nats]", title="Sum grows with |y|"
)
ax[1].scatter(n_tok, means, s=8)
ax[1].set(xlabel="target tokens |y|", ylabel="mean: per-token NLL", title="Mean is a rate")
plt.tight_layout()
plt.show()
r_sum, r_mean = np.corrcoef(n_tok, sums)[0, 1], np.corrcoef(n_tok, means)[0, 1]
print(f"correlation with |y|: sum {r_sum:.2f}, mean {r_mean:.2f}")

# %% [markdown]
# Measured on the 350 held-out samples: the per-sample sum correlates with the target length at
# 0.95, the per-sample mean at about −0.05. Sums of samples of different lengths are not
# comparable as rates; means are.

# %% [markdown]
# ## 3. Metric A (per sample) against metric B (the data set)
#
# Two different numbers are both called "the loss":
#
# * **metric A**, the per-sample loss: each sample's `-log Pr(y | x)`, here per target token;
# * **metric B**, the aggregate over the data set: $\sum_i L_i / \sum_i |y_i|$, the global token
#   mean (what `batch_loss(..., normalize="tokens")` computes, and the default for training).
#
# Metric B is **not** the mean of metric A: long targets weigh more in B. The plot shows metric
# A for every held-out sample by task family, with both averages.

# %%
families = [ex.family for ex in heldout]
metric_b = float(jaxnll.batch_loss(sums, n_tok, normalize="tokens"))
mean_of_a = float(jaxnll.batch_loss(sums, n_tok, normalize="samples"))
assert np.isclose(metric_b, sums.sum() / n_tok.sum(), rtol=1e-6)
assert np.isclose(mean_of_a, means.mean(), rtol=1e-6)

fig, ax = plt.subplots(figsize=(9, 4))
for k, fam in enumerate(dict.fromkeys(families)):
  sel = np.array([f == fam for f in families])
  ax.scatter(n_tok[sel], means[sel], s=10, label=fam, color=f"C{k}")
ax.axhline(metric_b, color="k", lw=2, label=f"metric B, token mean = {metric_b:.3f}")
ax.axhline(mean_of_a, color="k", ls="--", label=f"mean of metric A = {mean_of_a:.3f}")
ax.set(
  xlabel="target tokens |y|",
  ylabel="metric A: NLL per target token",
  title="Per-sample loss (metric A) vs the data-set aggregate (metric B), bigram model",
)
ax.legend(fontsize=8, ncol=2)
plt.show()
print(
  f"metric B = {metric_b:.3f} nats/token (perplexity {np.exp(metric_b):.2f}); "
  f"mean of metric A = {mean_of_a:.3f}; metric A ranges {means.min():.3f} .. {means.max():.3f}"
)
for fam in dict.fromkeys(families):
  sel = np.array([f == fam for f in families])
  print(
    f"  {fam:10s} {sel.sum():3d} samples, mean |y| {n_tok[sel].mean():5.1f}, "
    f"token share {n_tok[sel].sum() / n_tok.sum():5.1%}, "
    f"metric B within family {sums[sel].sum() / n_tok[sel].sum():.3f}"
  )

# %% [markdown]
# What the plot shows: metric A spreads from 2.25 to 5.58 nats per token, by family far more than
# by chance — reversing is the hardest for a bigram model (4.82 nats/token), look-ups and
# copying the easiest. Metric B (3.033) and the mean of metric A (3.067) differ because the
# three long-target families (copy, translate, upper) are 43% of the samples but 75% of the
# target tokens, and B weighs every token equally. Neither number is wrong; they answer different
# questions ("how well are tokens predicted" against "how well is a typical sample answered"),
# and a report should say which one it shows. The training loss of `jaxnll` is B's form
# (`normalize="tokens"`), so that gradient accumulation and devices reproduce it exactly
# (section 4b).

# %% [markdown]
# ## 4a. Bug one: the off-by-one that drops the first target token
#
# A common slip is to shift the tokens but not the mask — to mark the *positions of* `y` rather
# than the positions that *predict* `y`. The last context position then never counts, so the
# first token of every target is never trained, and the position after `y` (which predicts
# padding, or the next packed sample) may count instead. Here is the buggy mask next to the
# right one, on the small example from section 1:

# %%
buggy_mask = span & jnp.roll(span, -1).at[-1].set(False)  # positions *of* y that predict y
print("tokens     ", np.asarray(tokens))
print("right mask ", np.asarray(loss_mask, int), "  counts", int(loss_mask.sum()))
print("buggy mask ", np.asarray(buggy_mask, int), "  counts", int(buggy_mask.sum()))

# %% [markdown]
# On the held-out data with the bigram model, the dropped token is not a typical one: the first
# token of an answer carries the most information (which digit, which word), so dropping it
# makes the loss look *better* than it is.

# %%
b_buggy = b_span & jnp.roll(b_span, -1, axis=1)  # the same slip on the padded batch
first = b_mask & ~b_buggy  # exactly the first target token of each sample
assert int(first.sum()) == len(held_samples)
tok_loss = np.asarray(jaxnll.token_nll(b_logits, b_targets))
first_nll = tok_loss[np.asarray(first)].mean()
rest_nll = tok_loss[np.asarray(b_mask & b_buggy)].mean()
buggy_sums, buggy_n = nll.sequence_nll_and_count(b_logits, b_targets, b_buggy)
metric_b_buggy = float(jaxnll.batch_loss(buggy_sums, buggy_n))
print(f"NLL of the first target token {first_nll:.3f}, of the other target tokens {rest_nll:.3f}")
print(
  f"metric B: right {metric_b:.3f}, with the off-by-one {metric_b_buggy:.3f} "
  f"({int(buggy_n.sum())} instead of {int(n_tok.sum())} tokens)"
)

# %% [markdown]
# Measured: the first target token costs 3.50 nats under the bigram model, the others 2.98 on
# average. The off-by-one drops 350 of the 3227 target tokens (11%) and lowers metric B from
# 3.033 to 2.976 — the bug *looks like* an improvement.
#
# What the bug does to training shows best on a task where the answer is fully determined by
# the context. The task: `x` is four symbols out of eight, `y` is `x` reversed; rows are
# `[BOS, x, SEP, y]`. We train the same tiny transformer twice, with the right mask and with the
# off-by-one mask, and then score every target token on fresh samples.

# %%
K, N, BOS, SEP = 8, 4, 8, 9  # alphabet, length, special tokens; vocabulary of 10
tiny = ModelConfig(vocab_size=10, d_model=32, num_layers=2, num_heads=2, d_ff=64)


def reversal(rng, n, order="xy"):
  """Rows ``[BOS, x, SEP, y]`` (or ``[BOS, y, SEP, x]``) and the span of ``y``."""
  x = rng.integers(0, K, (n, N))
  y = x[:, ::-1]
  bos, sep = np.full((n, 1), BOS), np.full((n, 1), SEP)
  first, second = (x, y) if order == "xy" else (y, x)
  toks = np.concatenate([bos, first, sep, second], axis=1)
  span = np.zeros(toks.shape, bool)
  span[:, 2 + N :] = order == "xy"
  span[:, 1 : 1 + N] = order == "yx"
  return jnp.asarray(toks, jnp.int32), jnp.asarray(span)


def off_by_one(targets, mask):
  """The slip: the mask marks positions *of* y, not the positions that predict y."""
  previous = jnp.roll(mask, 1, axis=1).at[:, 0].set(False)
  return targets, mask & previous


def train_tiny(order="xy", mask_fn=None, steps=300, seed=0):
  model = make_model(tiny, seed=seed)
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  def loss_fn(model, toks, span):
    targets, mask = jaxnll.shift_targets(toks, span)
    if mask_fn is not None:
      targets, mask = mask_fn(targets, mask)
    sums, counts = nll.sequence_nll_and_count(model(toks), targets, mask)
    return jaxnll.batch_loss(sums, counts)

  @nnx.jit
  def step(model, opt, toks, span):
    loss, grads = nnx.value_and_grad(loss_fn)(model, toks, span)
    opt.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  curve = [float(step(model, opt, *reversal(rng, 64, order))) for _ in range(steps)]
  return model, np.array(curve)


def target_token_nll(model, toks, span):
  """NLL of every target token ``[B, |y|]`` (always with the right coordinates)."""
  targets, mask = jaxnll.shift_targets(toks, span)
  tok = jaxnll.token_nll(model(toks), targets)
  return np.asarray(tok)[np.asarray(mask)].reshape(toks.shape[0], -1)


t0 = time.time()
right_model, right_curve = train_tiny("xy")
buggy_model, buggy_curve = train_tiny("xy", mask_fn=off_by_one)
print(
  f"trained two tiny models ({sum(x.size for x in jax.tree.leaves(nnx.state(right_model, nnx.Param)))} "
  f"parameters each) in {time.time() - t0:.1f} s"
)

test_toks, test_span = reversal(np.random.default_rng(123), 512)
right_tok = target_token_nll(right_model, test_toks, test_span)
buggy_tok = target_token_nll(buggy_model, test_toks, test_span)

fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
ax[0].plot(right_curve, label="right mask")
ax[0].plot(buggy_curve, label="off-by-one mask")
ax[0].set(
  xlabel="step",
  ylabel="training loss (per counted token)",
  yscale="log",
  title="What each run reports",
)
ax[0].legend()
w = 0.38
ax[1].bar(np.arange(N) - w / 2, right_tok.mean(0), w, label="right mask")
ax[1].bar(np.arange(N) + w / 2, buggy_tok.mean(0), w, label="off-by-one mask")
ax[1].axhline(np.log(K), color="k", ls=":", label="log 8 (a guess)")
ax[1].set(
  yscale="log",
  xticks=range(N),
  xlabel="target token index",
  ylabel="held-out NLL",
  title="What each model can do",
)
ax[1].legend()
plt.tight_layout()
plt.show()
print("held-out NLL per target token, right mask:     ", right_tok.mean(0))
print("held-out NLL per target token, off-by-one mask:", buggy_tok.mean(0))
print(
  f"final training loss: right {right_curve[-20:].mean():.4f}, off-by-one {buggy_curve[-20:].mean():.4f}"
)

assert buggy_tok[:, 0].mean() > np.log(K) > 100 * right_tok.mean()

# %% [markdown]
# The off-by-one run reports a small training loss too (about 0.016 nats per counted token after
# 300 steps, against 0.006 for the right mask) — it only measures the tokens it kept. Yet it
# never learned the first token of the answer: on fresh samples that token costs about 6 nats,
# worse than guessing one of the eight symbols (log 8 = 2.08), while the right model pays under
# 0.01 nats for every target token. The position that predicts the first token received no
# gradient at all, so its output stayed whatever the rest of training made it.

# %% [markdown]
# ## 4b. Bug two: averaging averages under gradient accumulation
#
# A batch too large for memory is split into micro-batches whose gradients are added. If each
# micro-batch computes its own *mean* loss and the means are averaged, tokens in short
# micro-batches weigh more. Take a micro-batch with 2 target tokens at NLL 1 each and one with
# 8 target tokens at NLL 3 each. The full batch has 10 tokens and a token mean of
# $(2 \cdot 1 + 8 \cdot 3) / 10 = 2.6$; the average of the two micro-batch means is
# $(1 + 3) / 2 = 2.0$.
#
# `jaxnll` keeps per-sample **sums and token counts** as the currency: `loss_terms` returns a
# numerator and a denominator that add across micro-batches (and devices), and the division
# happens once at the end.


# %%
def constant_nll_logits(nll_value, n, length=8):
  """One row whose first ``n`` positions have NLL ``nll_value`` for target 0 (V = 2)."""
  q = np.exp(-nll_value)
  logits = np.log(np.array([q, 1 - q]))[None, None].repeat(length, 1)
  mask = np.arange(length)[None] < n
  return jnp.asarray(logits, jnp.float32), jnp.zeros((1, length), jnp.int32), jnp.asarray(mask)


micro = [constant_nll_logits(1.0, 2), constant_nll_logits(3.0, 8)]
full = tuple(jnp.concatenate(parts) for parts in zip(*micro, strict=True))


def mean_loss(logits, targets, mask):
  return jaxnll.batch_loss(*nll.sequence_nll_and_count(logits, targets, mask))


def terms(logits, targets, mask):
  return nll.loss_terms(*nll.sequence_nll_and_count(logits, targets, mask))


avg_of_avgs = np.mean([float(mean_loss(*m)) for m in micro])
num = sum(float(terms(*m)[0]) for m in micro)
den = sum(float(terms(*m)[1]) for m in micro)
print(
  f"full batch {float(mean_loss(*full)):.3f} | mean of micro-batch means {avg_of_avgs:.3f} | "
  f"summed loss_terms {num:.0f}/{den:.0f} = {num / den:.3f}"
)

# %% [markdown]
# The gradient inherits the same weighting. Differentiate with respect to the logits: with the
# summed terms every target token gets weight $1/10$, exactly as in the full batch; with the
# average of averages the two short-micro-batch tokens get $1/(2\cdot 2) = 0.25$ each and the
# other eight get $1/(2 \cdot 8) = 0.0625$.

# %%
g_full = jax.grad(lambda lg: mean_loss(lg, *full[1:]))(full[0])
g_avg = [jax.grad(lambda lg, m=m: mean_loss(lg, *m[1:]) / len(micro))(m[0]) for m in micro]
g_acc = [jax.grad(lambda lg, m=m: terms(lg, *m[1:])[0] / den)(m[0]) for m in micro]
g_avg, g_acc = jnp.concatenate(g_avg), jnp.concatenate(g_acc)
print("max |accumulated - full| =", float(jnp.abs(g_acc - g_full).max()))
print("max |average of averages - full| =", float(jnp.abs(g_avg - g_full).max()))


def token_weight(g, logits):
  """Weight of each token in the loss: dL/dlogit[target] / (p[target] - 1)."""
  p0 = jax.nn.softmax(logits)[..., 0]
  return np.asarray(g[..., 0] / (p0 - 1))


mask_all = np.asarray(full[2])
wt_full, wt_avg = token_weight(g_full, full[0])[mask_all], token_weight(g_avg, full[0])[mask_all]
fig, ax = plt.subplots(figsize=(8, 3))
idx = np.arange(10)
ax.bar(idx - 0.2, wt_full, 0.4, label="full batch = summed loss_terms")
ax.bar(idx + 0.2, wt_avg, 0.4, label="average of micro-batch averages")
ax.axvline(1.5, color="k", lw=0.8)
ax.text(0.5, 0.27, "micro-batch 1\n(2 tokens, NLL 1)", ha="center", fontsize=8)
ax.text(5.5, 0.27, "micro-batch 2 (8 tokens, NLL 3)", ha="center", fontsize=8)
ax.set(
  xlabel="target token",
  ylabel="weight in the loss",
  ylim=(0, 0.33),
  title="Per-token weight in the accumulated gradient",
)
ax.legend(loc="center right")
plt.show()
print("weights, full batch:", wt_full.round(4), "\nweights, avg of avgs:", wt_avg.round(4))

# %% [markdown]
# ## 5. Masking and `stop_gradient` give the same gradients
#
# The book describes selective gradient propagation: compute the whole sequence in the forward
# pass, but let error gradients flow back only from the target. `jaxnll` offers it two ways at
# the loss level:
#
# * `sequence_nll(logits, targets, loss_mask)` — only target positions enter the loss;
# * `selective_sequence_nll(logits, targets, loss_mask)` — the *value* is the loss over every
#   position (context too, handy for monitoring), but the context's part sits under
#   `stop_gradient`, so the *gradient* is that of the target-only loss.
#
# Compare both, and the full-sequence loss, on random logits and through the tiny model's
# parameters.

# %%
toks, span_b = reversal(np.random.default_rng(7), 16)
tg, lm = jaxnll.shift_targets(toks, span_b)
valid = jnp.ones_like(lm).at[:, -1].set(False)  # the last position predicts nothing
logits = jax.random.normal(jax.random.key(0), toks.shape + (10,))

losses = {
  "masked (sequence_nll)": lambda lg: jaxnll.sequence_nll(lg, tg, lm).sum(),
  "selective (stop_gradient)": lambda lg: jaxnll.selective_sequence_nll(lg, tg, lm, valid).sum(),
  "full sequence": lambda lg: jaxnll.sequence_nll(lg, tg, valid).sum(),
}
vals = {k: float(jax.jit(f)(logits)) for k, f in losses.items()}
grads = {k: jax.jit(jax.grad(f))(logits) for k, f in losses.items()}
for k in losses:
  print(f"{k:26s} value {vals[k]:8.3f}")
d_masked_sel = float(
  jnp.abs(grads["masked (sequence_nll)"] - grads["selective (stop_gradient)"]).max()
)
print("max |grad masked - grad selective| =", d_masked_sel)
assert d_masked_sel == 0.0


def param_grads(loss_kind):
  def f(model):
    lg = model(toks)
    if loss_kind == "masked":
      return jaxnll.sequence_nll(lg, tg, lm).sum()
    return jaxnll.selective_sequence_nll(lg, tg, lm, valid).sum()

  return jax.tree.leaves(nnx.grad(f)(right_model))


gm, gs = param_grads("masked"), param_grads("selective")
d_params = max(float(jnp.abs(a - b).max()) for a, b in zip(gm, gs, strict=True))
print("max |parameter grad masked - selective| over all parameters =", d_params)

fig, ax = plt.subplots(figsize=(8, 3))
for (k, g), style in zip(grads.items(), ["o-", "x--", "s:"], strict=True):
  ax.plot(np.asarray(jnp.linalg.norm(g, axis=-1).mean(0)), style, label=k, ms=7, alpha=0.8)
ax.axvspan(N + 0.5, 2 * N + 0.5, color="C2", alpha=0.1, label="positions predicting y")
ax.set(
  xlabel="position t",
  ylabel="mean |dL/dlogits[t]|",
  title="Gradient reaching each position's logits",
)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The two variants report different values (169.3 against 391.8 summed over the 16 rows: the
# selective one includes the context's loss, and equals the full-sequence value) but their
# gradients are bitwise identical (maximum difference 0.0), with respect to the logits and to every parameter of
# the model. The full-sequence loss, by contrast, also trains the model to predict the context.
#
# (Stopping gradients inside the *model*, at the context's activations, is a different and
# stronger intervention: `stop_gradient_outside`, used by `ModelConfig(context_gradient="stop")`.
# Notebook 02 compares it in training.)

# %% [markdown]
# ## 6. Why `[x, y]` and not `[y, x]`
#
# One source prints the sample reversed. In a causal model, the prediction at position `t`
# depends only on tokens `≤ t`. Put the target first and its context after, and every target
# token is predicted before the model has seen the context: the loss of `y` becomes
# $-\log \Pr(y)$, not $-\log \Pr(y \mid x)$.
#
# Measured two ways on the reversal task. First, analytically with a causal model: train a
# model on `[BOS, y, SEP, x]` and score the target with the true context, with a *random*
# context, and with **no context at all** (the row cut after `y`).

# %%
t0 = time.time()
yx_model, yx_curve = train_tiny("yx")
print(f"trained on [y, x] in {time.time() - t0:.1f} s")

rng = np.random.default_rng(321)
yx_toks, yx_span = reversal(rng, 512, "yx")
other = reversal(rng, 512, "yx")[0]
yx_random = yx_toks.at[:, 2 + N :].set(other[:, 2 + N :])  # same y, another x
yx_cut, yx_cut_span = yx_toks[:, : 2 + N], yx_span[:, : 2 + N]  # [BOS, y, SEP]: no x at all


def score(model, toks, span):
  return np.asarray(jaxnll.sequence_nll(model(toks), *jaxnll.shift_targets(toks, span)))


s_true, s_rand, s_none = (
  score(yx_model, *a) for a in [(yx_toks, yx_span), (yx_random, yx_span), (yx_cut, yx_cut_span)]
)
print(
  f"[y, x] model, NLL of y: true context {s_true.mean():.4f}, random context "
  f"{s_rand.mean():.4f}, no context {s_none.mean():.4f}"
)
print(
  "max |true - random| =",
  np.abs(s_true - s_rand).max(),
  "  max |true - none| =",
  np.abs(s_true - s_none).max(),
)
print(f"entropy of y (4 uniform symbols of 8) = 4 log 8 = {4 * np.log(K):.4f}")
assert np.array_equal(s_true, s_rand) and np.allclose(s_true, s_none, atol=1e-4)

# %% [markdown]
# The target's loss in a `[y, x]` row does not change when the context is replaced or removed:
# 8.330 nats with the true context, with a random one (bitwise equal) and with none (equal to
# 1e-6), against the entropy of `y`, 8.318. It is the same number because no target position
# can attend to the context. The best such a model can do is the entropy of `y` itself.
#
# Second, in training: the `[x, y]` model from section 4a against the `[y, x]` model, both
# scored on the target.

# %%
xy_score = score(right_model, test_toks, test_span)
fig, ax = plt.subplots(figsize=(8, 3.5))
ax.plot(right_curve * N, label="[x, y]: context before target")
ax.plot(yx_curve * N, label="[y, x]: target before context")
ax.axhline(4 * np.log(K), color="k", ls=":", label="no context: 4 log 8 = 8.32")
ax.set(
  xlabel="step",
  ylabel="-log Pr(y | ·) per sample [nats]",
  yscale="log",
  title="Target NLL during training",
)
ax.legend()
plt.show()
print(f"held-out target NLL per sample: [x, y] {xy_score.mean():.4f}, [y, x] {s_true.mean():.4f}")
print(f"notebook ran in {time.time() - start:.1f} s")

# %% [markdown]
# With the context first, the target NLL falls towards zero (about 0.02 nats per sample on fresh
# samples after 300 steps: the answer is a function of the context); with the target first it
# stalls at the no-context entropy, 8.32 nats per sample, from the first few steps on.
# The loss `-log Pr(y | x)` needs `x` *before* `y` in a causal model.
