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
# # Evaluating training strategies
#
# The book's exercise: fine-tune the same model on the same `[x, y]` samples with different
# training objectives and compare them on what fine-tuning is for — the likelihood of held-out
# **targets** given their contexts. Three strategies:
#
# 1. **full sequence** — the ordinary language-model loss over every token, context included
#    (`TrainConfig(loss="full")`);
# 2. **sub-sequence** — `-log Pr(y | x)`, only target positions count
#    (`TrainConfig(loss="subsequence")`); the loss-level `stop_gradient` variant
#    (`loss="selective"`) has bitwise the same gradients (notebook 01), so it trains
#    identically and is not run again;
# 3. **sub-sequence with the context frozen** — the same loss, and in addition the model stops
#    every gradient at the context's activations (`ModelConfig(context_gradient="stop")`,
#    `jaxnll.stop_gradient_outside` on the embeddings and every layer's output). The forward
#    pass is unchanged; the part of the network that computes the context receives no error
#    signal.
#
# Same model, same initialisation, same batches, same optimizer, same number of steps. The
# sizes are small so that the notebook runs in a minute or two on a CPU: read the numbers as a
# short-budget comparison, not as converged results.

# %%
import dataclasses
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import jaxnll
from jaxnll import nll, train
from jaxnll.train import data, metrics
from jaxnll.train.model import ModelConfig, count_params

start = time.time()
print("jax", jax.__version__, "on", jax.devices()[0].platform)

# %% [markdown]
# ## The data and how much of it is target
#
# The embedded data set has seven task families (arithmetic, reversing, copying, upper-casing,
# a phrase table, look-ups). Every row is `BOS USER prompt EOS ASSISTANT answer EOS`; the span
# is the answer and its `EOS`.

# %%
train_examples = data.embedded_examples("train")
held_examples = data.embedded_examples("heldout")
train_samples = data.encode_all(train_examples, data.MAX_LEN)
held_samples = data.encode_all(held_examples, data.MAX_LEN)

n_all = sum(len(t) - 1 for t, _ in train_samples)  # positions that predict a token
n_target = sum(int(s.sum()) for _, s in train_samples)
print(f"{len(train_samples)} training / {len(held_samples)} held-out samples")
print(f"predicted positions: {n_all}, of which targets {n_target} ({n_target / n_all:.1%})")

# %% [markdown]
# ## Three runs
#
# A 2-layer transformer (width 64) on packed rows of 128 tokens, 16 rows a step, AdamW with
# warm-up and cosine decay, 120 steps (a little over one pass over the training split). The
# held-out target NLL (metric B: summed NLL over summed target tokens) is measured every 20
# steps with `train.evaluate`.

# %%
STEPS, EVAL_EVERY = 120, 20
base_model = ModelConfig(d_model=64, num_layers=2, num_heads=4, d_ff=192)
spec = data.BatchSpec(rows=16, length=128, pack=True, segments=8)
strategies = {
  "full sequence": ("full", "flow"),
  "sub-sequence": ("subsequence", "flow"),
  "sub-sequence, context frozen": ("subsequence", "stop"),
}


def heldout_nll(model):
  sums, counts = train.evaluate(model, held_samples, spec)
  return metrics.aggregate_loss(sums, counts), sums, counts


runs = {}
for name, (loss, context_gradient) in strategies.items():
  t0 = time.time()
  config = train.RunConfig(
    model=dataclasses.replace(base_model, context_gradient=context_gradient),
    train=train.TrainConfig(loss=loss, learning_rate=3e-3, warmup_steps=10),
    batch=spec,
    steps=STEPS,
    seed=0,
  )
  trainer = train.build_trainer(config)
  stream = data.train_stream(train_samples, spec, seed=config.seed)
  log = {"step": [0], "heldout": [heldout_nll(trainer.model)[0]], "loss": [], "target_loss": []}
  seen = 0
  for step in range(1, STEPS + 1):
    batch = next(stream).batch
    seen += int((batch["sample_ids"] >= 0).sum())
    out = train.train_step(trainer, train.micro_batches(batch, 1), objective=train.SFT(loss))
    log["loss"].append(float(out["loss"]))
    log["target_loss"].append(float(out["target_loss"]))
    if step % EVAL_EVERY == 0:
      log["step"].append(step)
      log["heldout"].append(heldout_nll(trainer.model)[0])
  log["model"] = trainer.model
  log["seconds"] = time.time() - t0
  runs[name] = log
  print(
    f"{name:30s} held-out target NLL {log['heldout'][0]:.3f} -> {log['heldout'][-1]:.3f} "
    f"nats/token in {log['seconds']:.1f} s"
  )
print(
  f"{count_params(trainer.model):,} parameters per model; each run saw {seen} samples "
  f"({seen / len(train_samples):.2f} epochs)"
)

# %%
fig, ax = plt.subplots(1, 2, figsize=(11, 4))
for k, (name, log) in enumerate(runs.items()):
  ax[0].plot(log["step"], log["heldout"], "o-", color=f"C{k}", label=name)
  ax[1].plot(np.arange(1, STEPS + 1), log["loss"], color=f"C{k}", alpha=0.8, label=name)
ax[0].set(
  xlabel="step",
  ylabel="held-out target NLL [nats/token]",
  title="Held-out -log Pr(y|x) per target token (metric B)",
)
ax[1].set(
  xlabel="step",
  ylabel="training loss (the objective)",
  yscale="log",
  title="What each run optimises",
)
ax[0].legend()
ax[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Measured (the run committed here): from 5.556 nats/token at initialisation, the held-out
# target NLL after 120 steps is 2.651 with the full-sequence loss, 2.312 with the sub-sequence
# loss and 2.339 with the context frozen. The sub-sequence runs are ahead at every evaluation
# from step 20 on.
#
# The right panel is a warning about reading logs: the full-sequence run reports the loss over
# *all* tokens, which mixes the prompts' loss in, so its curve is not comparable with the other
# two. The left panel scores all three the same way.

# %% [markdown]
# ## Per-sample losses (metric A) on the held-out set
#
# One number per strategy hides how the loss is spread over samples. Metric A — each held-out
# sample's NLL per target token — as a distribution, and by task family:

# %%
final = {name: heldout_nll(log["model"]) for name, log in runs.items()}
per_sample = {name: metrics.per_sample_loss(s, c) for name, (_, s, c) in final.items()}
families = np.array([ex.family for ex in held_examples])
fams = list(dict.fromkeys(families))

fig, ax = plt.subplots(1, 2, figsize=(12, 4))
for k, (name, a) in enumerate(per_sample.items()):
  ax[0].plot(np.sort(a), np.linspace(0, 1, len(a)), lw=2, color=f"C{k}", label=name)
  ax[0].axvline(final[name][0], color=f"C{k}", ls="--", lw=1)
ax[0].set(
  xlabel="metric A: NLL per target token",
  ylabel="fraction of held-out samples below",
  title="Distribution over samples (dashed: metric B)",
)
ax[0].legend(fontsize=8)
w = 0.27
for k, (name, a) in enumerate(per_sample.items()):
  ax[1].bar(
    np.arange(len(fams)) + (k - 1) * w,
    [np.median(a[families == f]) for f in fams],
    w,
    color=f"C{k}",
    label=name,
  )
ax[1].set(xticks=range(len(fams)), ylabel="median metric A", title="By task family")
ax[1].set_xticklabels(fams, rotation=30)
plt.tight_layout()
plt.show()

print(f"{'strategy':30s} {'metric B':>9s} {'median A':>9s} {'90th pct A':>10s}")
for name, a in per_sample.items():
  print(f"{name:30s} {final[name][0]:9.3f} {np.median(a):9.3f} {np.percentile(a, 90):10.3f}")
print("\nmedian metric A by family:")
print(f"{'family':10s}" + "".join(f"{n[:22]:>24s}" for n in per_sample))
for f in fams:
  print(f"{f:10s}" + "".join(f"{np.median(a[families == f]):24.3f}" for a in per_sample.values()))

# %% [markdown]
# The sub-sequence model is better across the distribution, not only on average: median
# metric A 2.08 against 2.38 for the full-sequence model, 90th percentile 3.28 against 3.60.
# By family it is ahead on six of the seven; the exception is `copy` (2.38 against 2.29), the
# family whose answer is a verbatim piece of the prompt — plausibly, learning to predict the
# prompt is practice for it (an interpretation, not measured here). Freezing the context's
# activations tracks the plain sub-sequence run family by family, within about 0.1 nats.

# %% [markdown]
# ## How sure are the differences?
#
# All three models are scored on the same 350 held-out samples, so the comparison is paired.
# The mean per-sample difference of metric A, with its standard error over samples, says how
# much of a gap the evaluation set can resolve (it does not cover the run-to-run variance of
# training, which one seed cannot show).

# %%
names = list(per_sample)
pairs = [(names[0], names[1]), (names[2], names[1])]
for a_name, b_name in pairs:
  d = per_sample[a_name] - per_sample[b_name]
  se = d.std(ddof=1) / np.sqrt(len(d))
  better = (d > 0).mean()
  print(
    f"{a_name} - {b_name}: mean {d.mean():+.3f} ± {se:.3f} nats/token "
    f"(sub-sequence lower on {better:.0%} of samples)"
  )

# %% [markdown]
# Full sequence against sub-sequence: +0.356 ± 0.019 nats/token, the sub-sequence model lower on
# 83% of the samples — far outside the evaluation noise. Context frozen against sub-sequence:
# +0.030 ± 0.007, the plain run lower on 53% of samples — resolvable on this set but small, and
# of the size a different seed could change.

# %% [markdown]
# ## What did the full-sequence loss buy? The context's likelihood
#
# The full-sequence model spends part of its updates on predicting the prompts. Measure each
# model's NLL on the held-out **context** tokens (every predicted position that is not a
# target):


# %%
def context_nll(model):
  total, count = 0.0, 0.0
  for batch in data.eval_batches(held_samples, spec):
    tokens, seg = jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"])
    targets, target_mask = jaxnll.shift_targets(tokens, jnp.asarray(batch["span_mask"]), seg)
    _, valid = jaxnll.shift_targets(tokens, seg > 0, seg)
    logits = model(tokens, segment_ids=seg, positions=jnp.asarray(batch["positions"]))
    sums, counts = nll.sequence_nll_and_count(logits, targets, valid & ~target_mask)
    total, count = total + float(sums.sum()), count + float(counts.sum())
  return total / count


ctx = {name: context_nll(log["model"]) for name, log in runs.items()}
fig, ax = plt.subplots(figsize=(7, 3.2))
x = np.arange(len(runs))
ax.bar(x - 0.2, [ctx[n] for n in runs], 0.4, label="context tokens")
ax.bar(x + 0.2, [final[n][0] for n in runs], 0.4, label="target tokens")
ax.set_xticks(x, list(runs))
ax.set(ylabel="held-out NLL [nats/token]", title="Where each model's likelihood went")
ax.legend()
plt.show()
for name in runs:
  print(f"{name:30s} context {ctx[name]:.3f}  target {final[name][0]:.3f} nats/token")

# %%
summary = {name: round(final[name][0], 3) for name in runs}
print(summary)
print(f"notebook ran in {time.time() - start:.1f} s")

# %% [markdown]
# The full-sequence model predicts held-out *prompts* at 0.91 nats/token; the two sub-sequence
# models, never trained on them, stay near 4 nats/token (3.96 and 4.00). The prompts are
# templated and easy, and they are 85% of the predicted positions, so they take most of the
# full-sequence objective: its training loss falls to about 1 nat/token while its target NLL
# stays the worst of the three.
#
# ## What the measurements say
#
# * With the same model, data, optimizer and 120 steps, training on the **target sub-sequence**
#   gives the best held-out `-log Pr(y | x)`: 2.31 nats/token against 2.65 for the
#   **full-sequence** loss (target perplexity 10.1 against 14.2). The full-sequence loss spends
#   its updates on the 85% of positions that are context.
# * **Freezing the context's activations** (model-level selective propagation) costs little
#   here: 2.34 against 2.31 nats/token, +0.03 ± 0.007 on the paired held-out comparison. The
#   part of the network that computes the context still learns through the target positions'
#   own activations and shared weights; what it loses is the error signal arriving through
#   attention to the context.
# * The loss-level `stop_gradient` variant (`loss="selective"`) is not a fourth strategy: its
#   gradients are bitwise those of the sub-sequence loss (notebook 01); it only changes the
#   number that is logged.
# * The full-sequence model is the only one that models the prompts (0.91 against about 4
#   nats/token). Whether that ever pays off for the targets — for instance with little
#   target data, or for the `copy` family, the one where it was already ahead — needs longer runs
#   and several seeds than this notebook's minute allows.
