# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Knowledge distillation: teacher → student
#
# A trained teacher knows more than the one reference answer of each training sample: at every
# target position it holds a whole next-token distribution. Distillation passes that on to a
# smaller student. Three ways to fine-tune the student on the same few samples:
#
# 1. **plain fine-tuning** — the sub-sequence NLL of the reference answers,
#    `-log Pr(y | x)` (`jaxnll.sequence_nll`);
# 2. **token-level KD** (Hinton et al., 2015) — at every target position, the cross-entropy
#    against the teacher's distribution, $-\sum_v p_{\text{teacher}}(v) \log
#    p_{\text{student}}(v)$ (`jaxnll.distill_cross_entropy`), mixed with the NLL:
#    $(1 - \alpha)\,\mathrm{NLL} + \alpha\,\tau^2\,\mathrm{KD}$;
# 3. **sequence-level KD** (Kim & Rush, 2016) — the NLL of the teacher's own greedy answer
#    $\hat y$, `-log Pr(ŷ | x)`, mixed with the NLL of the reference.
#
# To see the difference in a minute on a CPU, the task is small and has something for a teacher
# to know: `x` is four letters from `a..h`, and each letter of the answer is its upper case with
# probability 0.75 or its index as a digit with probability 0.25 (`"abch"` → `"ABCH"`, or
# `"A1CH"`, ...). The best possible model pays the entropy of that choice; the most likely answer
# is the all-upper-case one.

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import jaxnll
from jaxnll import nll, train
from jaxnll.train import data, metrics
from jaxnll.train.model import ModelConfig, count_params, make_model

start = time.time()
print("jax", jax.__version__, "on", jax.devices()[0].platform)

LETTERS, N, P_UPPER, LENGTH = "abcdefgh", 4, 0.75, 16


def make_examples(rng, n):
  """``n`` samples of the task as ordinary chat examples (byte tokens, like the demo data)."""
  out = []
  for _ in range(n):
    x = "".join(rng.choice(list(LETTERS), N))
    y = "".join(c.upper() if rng.random() < P_UPPER else str(LETTERS.index(c)) for c in x)
    out.append(data.Example.pair(x, y, family="letters"))
  return out


def most_likely(prompt):
  return prompt.upper()


test_examples = make_examples(np.random.default_rng(0), 1000)
test_samples = data.encode_all(test_examples, LENGTH)
eval_spec = data.BatchSpec(rows=250, length=LENGTH)
h_letter = -(P_UPPER * np.log(P_UPPER) + (1 - P_UPPER) * np.log(1 - P_UPPER))
entropy = h_letter * N / (N + 1)  # per target token: 4 letters and a certain EOS
print("examples:", [(ex.prompt, ex.response) for ex in test_examples[:4]])
print(f"best possible held-out NLL: {entropy:.4f} nats per target token")


def heldout_nll(model):
  return metrics.aggregate_loss(*train.evaluate(model, test_samples, eval_spec))


def greedy_accuracy(model, n=300):
  """Share of held-out prompts whose greedy answer is the most likely answer."""
  outs = train.greedy_responses(model, test_examples[:n], length=LENGTH, max_new=N + 2)
  return float(
    np.mean([o == most_likely(ex.prompt) for o, ex in zip(outs, test_examples, strict=False)])
  )


# %% [markdown]
# ## The training loop
#
# One small loop serves the teacher and all three students; only the objective changes. Batches
# are the padded batches of `jaxnll.data`; the loss pieces are jaxnll's. Per-sample sums and
# token counts are summed over the batch and divided once (the global token mean); for sequence
# KD the denominator is $(1-\alpha)|y| + \alpha|\hat y|$ target tokens.


# %%
def objective(model, batch, mode, alpha, tau):
  targets, mask = jaxnll.shift_targets(batch["tokens"], batch["span_mask"])
  if mode.startswith("fused:"):  # no logits of either model (the last section)
    return fused_objective(model, batch, mode[len("fused:") :], alpha, tau, targets, mask)
  logits = model(batch["tokens"])
  sums, counts = nll.sequence_nll_and_count(logits, targets, mask)
  if mode == "plain":
    return sums.sum() / counts.sum()
  if mode == "token":
    kd = jaxnll.distill_cross_entropy(logits, batch["teacher_logits"], mask, temperature=tau)
    return ((1 - alpha) * sums.sum() + alpha * tau**2 * kd.sum()) / counts.sum()
  kd_targets, kd_mask = jaxnll.shift_targets(batch["kd_tokens"], batch["kd_span_mask"])
  kd_sums, kd_counts = nll.sequence_nll_and_count(model(batch["kd_tokens"]), kd_targets, kd_mask)
  num = (1 - alpha) * sums.sum() + alpha * kd_sums.sum()
  return num / ((1 - alpha) * counts.sum() + alpha * kd_counts.sum())


def fit(config, steps, next_batch, *, mode="plain", alpha=0.5, tau=1.0, seed=0, evals=4):
  model = make_model(config, seed=seed)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, steps, 3e-4)
  opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch):
    loss, grads = nnx.value_and_grad(objective)(model, batch, mode, alpha, tau)
    opt.update(model, grads)
    return loss

  curve = {"step": [0], "heldout": [heldout_nll(model)]}
  for i in range(1, steps + 1):
    step(model, opt, next_batch())
    if i % (steps // evals) == 0:
      curve["step"].append(i)
      curve["heldout"].append(heldout_nll(model))
  return model, curve


def padded(samples, ids):
  b = data.pad_batch([samples[i] for i in ids], list(ids), rows=len(ids), length=LENGTH)
  return {"tokens": jnp.asarray(b["tokens"]), "span_mask": jnp.asarray(b["span_mask"])}


# %% [markdown]
# ## The teacher
#
# A 2-layer transformer trained on fresh samples every step (about 16k samples in all).

# %%
teacher_config = ModelConfig(d_model=64, num_layers=2, num_heads=4, d_ff=128)
teacher_rng = np.random.default_rng(1)


def teacher_batch():
  samples = data.encode_all(make_examples(teacher_rng, 64), LENGTH)
  return padded(samples, range(64))


t0 = time.time()
teacher, teacher_curve = fit(teacher_config, 250, teacher_batch)
teacher_nll, teacher_acc = teacher_curve["heldout"][-1], greedy_accuracy(teacher)
print(
  f"teacher: {count_params(teacher):,} parameters, held-out NLL {teacher_nll:.4f} "
  f"nats/token (entropy {entropy:.4f}), greedy = most likely answer on {teacher_acc:.1%}; "
  f"{time.time() - t0:.1f} s"
)

# %% [markdown]
# What token-level KD passes on: at a position that writes a letter's answer, the reference
# holds one token, the teacher a distribution.

# %%
probe = data.Example.pair("cafe", "C0FE")
tokens, span = data.encode(probe)
targets, mask = jaxnll.shift_targets(jnp.asarray(tokens)[None], jnp.asarray(span)[None])
probs = jax.nn.softmax(teacher(jnp.asarray(tokens)[None])[0])
at = int(np.flatnonzero(np.asarray(mask[0]))[1])  # predicts the answer's second character
candidates = {"A": ord("A"), "0": ord("0"), "B": ord("B"), "1": ord("1"), "a": ord("a")}
fig, ax = plt.subplots(figsize=(6, 2.8))
x = np.arange(len(candidates))
ax.bar(x - 0.2, [float(k == "0") for k in candidates], 0.4, label="reference (one-hot)")
ax.bar(x + 0.2, [float(probs[at, v]) for v in candidates.values()], 0.4, label="teacher")
ax.set_xticks(x, list(candidates))
ax.set(ylabel="probability", title="Target for the answer's 2nd character of 'cafe'")
ax.legend()
plt.show()
print({k: round(float(probs[at, v]), 3) for k, v in candidates.items()})

# %% [markdown]
# ## Three students on 64 samples
#
# The student is a smaller transformer (2 layers, width 32), trained for 160 steps of 32 rows on
# the same 64 training samples (80 epochs: small data, the setting where a teacher helps).
# For sequence-level KD the teacher first answers the 64 training prompts greedily. Both KD
# students use $\alpha = 1$ — pure distillation, they never see a reference answer — so the
# three students differ only in what they learn from: the references, the teacher's
# distributions, or the teacher's answers. (In practice $\alpha$ mixes in the references; with
# $\alpha = 0.5$ the same comparison gave 0.675, 0.609 and 0.703 nats/token.)

# %%
student_config = ModelConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64)
student_examples = make_examples(np.random.default_rng(2), 64)
student_samples = data.encode_all(student_examples, LENGTH)

t0 = time.time()
answers = train.greedy_responses(teacher, student_examples, length=LENGTH, max_new=N + 2)
answer_samples = data.encode_all(
  [data.Example.pair(ex.prompt, a) for ex, a in zip(student_examples, answers, strict=True)],
  LENGTH,
)
same = np.mean([a == ex.response for a, ex in zip(answers, student_examples, strict=True)])
mode = np.mean(
  [a == most_likely(ex.prompt) for a, ex in zip(answers, student_examples, strict=True)]
)
print(
  f"teacher answers: equal to the reference on {same:.0%}, to the most likely answer on "
  f"{mode:.0%} ({time.time() - t0:.1f} s)"
)


@nnx.jit
def teacher_logits(tokens):
  return teacher(tokens)


def student_batches(mode, seed=3):
  rng = np.random.default_rng(seed)

  def next_batch():
    ids = rng.choice(len(student_samples), 32, replace=False)
    batch = padded(student_samples, ids)
    if mode == "token":
      batch["teacher_logits"] = teacher_logits(batch["tokens"])
    if mode == "sequence":
      kd = padded(answer_samples, ids)
      batch["kd_tokens"], batch["kd_span_mask"] = kd["tokens"], kd["span_mask"]
    return batch

  return next_batch


students, curves, seconds = {}, {}, {}
ALPHA = 1.0  # pure distillation: the KD students never see the reference answers
for name, mode_ in [
  ("plain fine-tuning", "plain"),
  ("token-level KD", "token"),
  ("sequence-level KD", "sequence"),
]:
  t0 = time.time()
  students[name], curves[name] = fit(
    student_config, 160, student_batches(mode_), mode=mode_, alpha=ALPHA, seed=5, evals=8
  )
  seconds[name] = time.time() - t0
  print(f"{name:18s} held-out NLL {curves[name]['heldout'][-1]:.4f} in {seconds[name]:.1f} s")
print(f"student: {count_params(students['plain fine-tuning']):,} parameters")


# %%
def valid_answers(model, n=500):
  """At held-out letter positions: the probability of the two valid answers (upper case and
  digit), summed, and the share of upper case between them (the task's is 0.75)."""
  batch = padded(test_samples, range(n))
  targets, mask = jaxnll.shift_targets(batch["tokens"], batch["span_mask"])
  probs = np.asarray(jax.nn.softmax(model(batch["tokens"])))
  rows_, cols = np.nonzero(np.asarray(mask) & (np.asarray(targets) != data.EOS))
  letter = np.asarray(batch["tokens"])[rows_, cols - (N + 1)] - ord("a")  # the prompt letter
  p_up = probs[rows_, cols, letter + ord("A")]
  p_digit = probs[rows_, cols, letter + ord("0")]
  return float((p_up + p_digit).mean()), float((p_up / (p_up + p_digit)).mean())


rows = {"teacher": (teacher_nll, teacher_acc, *valid_answers(teacher))}
for name, model in students.items():
  rows[name] = (curves[name]["heldout"][-1], greedy_accuracy(model), *valid_answers(model))

fig, ax = plt.subplots(1, 2, figsize=(11, 4))
for k, (name, c) in enumerate(curves.items()):
  ax[0].plot(c["step"], c["heldout"], "o-", color=f"C{k}", label=name)
ax[0].axhline(teacher_nll, color="k", ls="--", label="teacher")
ax[0].axhline(entropy, color="k", ls=":", label="entropy (best possible)")
ax[0].set(
  xlabel="student step",
  ylabel="held-out NLL [nats/token]",
  yscale="log",
  title="Held-out -log Pr(y|x) per target token",
)
ax[0].legend(fontsize=8)
names = list(rows)
x = np.arange(len(names))
ax[1].bar(x - 0.2, [rows[n][2] for n in names], 0.4, color="0.6", label="Pr(either valid answer)")
ax[1].bar(x + 0.2, [rows[n][3] for n in names], 0.4, color="C0", label="upper-case share of it")
ax[1].axhline(P_UPPER, color="k", ls=":", label=f"the task's share, {P_UPPER}")
ax[1].set_xticks(x, names, rotation=15)
ax[1].set(ylabel="mean over held-out letters", ylim=(0, 1.1), title="What each model predicts")
ax[1].legend(fontsize=8, loc="lower left")
plt.tight_layout()
plt.show()

print(
  f"{'model':18s} {'held-out NLL':>12s} {'excess':>8s} {'greedy = mode':>14s} "
  f"{'Pr(valid)':>10s} {'upper share':>12s}"
)
for name, (h, a, pv, share) in rows.items():
  print(f"{name:18s} {h:12.4f} {h - entropy:8.4f} {a:14.1%} {pv:10.3f} {share:12.3f}")

# %% [markdown]
# ## What the measurements say
#
# * **The teacher** (83k parameters) reaches 0.4605 nats per target token against the task's
#   entropy of 0.4499, and splits its probability between the two valid answers as the data do
#   (upper-case share 0.750; at the probe above, 0.769 for `A` and 0.220 for `0`). Its greedy
#   answer is the most likely answer on every held-out prompt, and equals the sampled reference
#   on only 34% of the training prompts.
# * **Token-level KD** gives the best student: held-out NLL 0.595 against 0.675 for plain
#   fine-tuning on the same 64 samples — the excess over the entropy drops from 0.225 to 0.145
#   nats/token, by about a third. It puts more probability on the valid answers (0.856 against
#   0.804) and splits it as the teacher does (0.745). Every training position carried the
#   teacher's whole distribution instead of one sampled token.
# * **Sequence-level KD** learns the teacher's *answers*, which are always the upper-case mode:
#   its upper-case share is 0.996, so a reference with a digit in it is very unlikely under the
#   student, and its held-out NLL is 2.40 nats/token — far worse than the other two — while its
#   greedy answers are as good as the teacher's (100% the most likely answer; token KD 100%,
#   plain fine-tuning 99%). It transmits the decision, not the uncertainty.
# * What to use: to match the teacher's *likelihoods* (scoring, calibration, a student that is
#   later sampled from), token-level KD; sequence-level KD targets the student's greedy / beam
#   *outputs*, and on this easy task every student already decodes the mode, so its benefit does
#   not show here while its cost in likelihood does. One seed and one synthetic task: the sizes
#   of the gaps are this run's, the directions are what the two objectives are built to do.

# %% [markdown]
# ## Four divergences, fused: no logits of either model
#
# At a real pair the two `[B, T, V]` logits tensors are the cost of token-level KD.
# `jaxnll.linear_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
# span_mask, kind=...)` takes both models' final hidden states and heads instead (their hidden
# sizes may differ), compacts the target span and streams vocabulary tiles of both heads with
# two running log-sum-exps and one running weighted sum; the backward recomputes the tiles.
# With `targets=` it also returns the student's NLL of the references from the same pass of its
# head (one forward, one gradient pass for both terms). The divergence, per target position:
#
# * `"ce"` — $-\sum_v p_t \log p_s$, the loss above (`distill_cross_entropy`);
# * `"kl"` — forward $\mathrm{KL}(p_t \| p_s)$: the cross-entropy minus the teacher's entropy,
#   a constant for the student, so **the same gradient as `"ce"`**;
# * `"reverse_kl"` — $\mathrm{KL}(p_s \| p_t)$: mode-seeking, it pays little for ignoring what
#   the teacher deems possible;
# * `"jsd"` — GKD's generalised Jensen–Shannon divergence (with `beta` 0.5 here), in between.
#
# Four students from the same teacher, same seed, same batches, 160 steps, $\alpha = 1$ and
# $\tau = 1$ as above; the teacher's hidden states enter each batch in place of its logits.


# %%
teacher_weight, teacher_layout = teacher.output_head()


def fused_objective(model, batch, kind, alpha, tau, targets, mask):
  hidden = model(batch["tokens"], return_hidden=True)
  weight, layout = model.output_head()
  kd, ref_nll = jaxnll.linear_distill_loss(
    hidden, weight, batch["teacher_hidden"], teacher_weight, mask, kind=kind, temperature=tau,
    targets=targets, student_weight_layout=layout, teacher_weight_layout=teacher_layout,
  )  # fmt: skip
  return ((1 - alpha) * ref_nll.sum() + alpha * tau**2 * kd.sum()) / mask.sum()


@nnx.jit
def teacher_hidden(tokens):
  return teacher(tokens, return_hidden=True)


def fused_batches(seed=3):
  plain = student_batches("plain", seed)  # the same samples, in the same order, as above

  def next_batch():
    batch = plain()
    batch["teacher_hidden"] = teacher_hidden(batch["tokens"])
    return batch

  return next_batch


KINDS = ("ce", "kl", "reverse_kl", "jsd")
for kind in KINDS:
  name = f"fused {kind}"
  t0 = time.time()
  students[name], curves[name] = fit(
    student_config, 160, fused_batches(), mode=f"fused:{kind}", alpha=ALPHA, seed=5, evals=8
  )
  seconds[name] = time.time() - t0
  rows[name] = (curves[name]["heldout"][-1], greedy_accuracy(students[name]),
                *valid_answers(students[name]))  # fmt: skip
  print(f"{name:18s} held-out NLL {curves[name]['heldout'][-1]:.6f} in {seconds[name]:.1f} s")
print(
  f"token-level KD on the logits (the section above): {curves['token-level KD']['heldout'][-1]:.6f}"
)

# %%
fig, ax = plt.subplots(1, 2, figsize=(11, 4))
for k, kind in enumerate(KINDS):
  c = curves[f"fused {kind}"]
  ax[0].plot(c["step"], c["heldout"], "os^D"[k] + "-", color=f"C{k + 3}", label=f"fused {kind}",
             alpha=0.8, markersize=8 - 1.5 * k)  # fmt: skip
c = curves["plain fine-tuning"]
ax[0].plot(c["step"], c["heldout"], "x:", color="C0", label="plain fine-tuning")
ax[0].axhline(entropy, color="k", ls=":", label="entropy (best possible)")
ax[0].set(xlabel="student step", ylabel="held-out NLL [nats/token]", yscale="log",
          title="Held-out -log Pr(y|x): the four divergences")  # fmt: skip
ax[0].legend(fontsize=8)
names = ["teacher", "plain fine-tuning"] + [f"fused {k}" for k in KINDS]
x = np.arange(len(names))
ax[1].bar(x - 0.2, [rows[n][2] for n in names], 0.4, color="0.6", label="Pr(either valid answer)")
ax[1].bar(x + 0.2, [rows[n][3] for n in names], 0.4, color="C0", label="upper-case share of it")
ax[1].axhline(P_UPPER, color="k", ls=":", label=f"the task's share, {P_UPPER}")
ax[1].set_xticks(x, names, rotation=20)
ax[1].set(ylabel="mean over held-out letters", ylim=(0, 1.1), title="What each student predicts")
ax[1].legend(fontsize=8, loc="lower left")
plt.tight_layout()
plt.show()
print(
  f"{'model':18s} {'held-out NLL':>12s} {'excess':>8s} {'greedy = mode':>14s} "
  f"{'Pr(valid)':>10s} {'upper share':>12s}"
)
for name in names:
  h, a, pv, share = rows[name]
  print(f"{name:18s} {h:12.4f} {h - entropy:8.4f} {a:14.1%} {pv:10.3f} {share:12.3f}")

# %% [markdown]
# ## Memory: fused against the logits, at a real head pair
#
# Compile only (`jax.jit(f).lower(...).compile().memory_analysis()`: XLA's own accounting,
# nothing allocated or run), forward + backward (gradients for the student's hidden states and
# head) of the `"ce"` loss at the Gemma-2 9B → 2B head pair: teacher D 3584, student D 2304,
# V 256,000, soft-cap 30, 4 × 2048 target tokens, bf16. `implementation="xla"` materialises both
# logits; `"chunked"` is the kernel `"auto"` runs on a CPU.

# %%
GEMMA = dict(teacher_d=3584, student_d=2304, vocab=256_000, softcap=30.0, tokens=(4, 2048))


def compiled_temp_gib(implementation):
  b, t = GEMMA["tokens"]
  bf16 = jnp.bfloat16
  shapes = [
    jax.ShapeDtypeStruct((b, t, GEMMA["student_d"]), bf16),
    jax.ShapeDtypeStruct((GEMMA["student_d"], GEMMA["vocab"]), bf16),
    jax.ShapeDtypeStruct((b, t, GEMMA["teacher_d"]), bf16),
    jax.ShapeDtypeStruct((GEMMA["teacher_d"], GEMMA["vocab"]), bf16),
    jax.ShapeDtypeStruct((b, t), jnp.bool_),
  ]

  def loss(hs, ws, ht, wt, mask):
    return jaxnll.linear_distill_loss(
      hs, ws, ht, wt, mask, logit_softcap=GEMMA["softcap"], implementation=implementation
    ).sum()

  t0 = time.time()
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes / 2**30
  print(f"{implementation:8s} temp {temp:8.3f} GiB (compiled in {time.time() - t0:.1f} s)")
  return temp


logits_gib, fused_gib = compiled_temp_gib("xla"), compiled_temp_gib("chunked")
print(f"fused / logits: 1/{logits_gib / fused_gib:.0f}")
print(f"notebook ran in {time.time() - start:.1f} s")

# %% [markdown]
# ## What the divergences and the memory say
#
# * **`"ce"` and `"kl"` train the same student**: held-out NLL 0.594858 both, and equal to the
#   token-level KD student of the logits path above (0.594858, same seed and batches): the fused
#   loss reproduces the logits path, and forward KL differs from the cross-entropy only by the
#   teacher's entropy, which has no gradient.
# * **`"reverse_kl"`** is mode-seeking: its student pays little for the digit answers the
#   teacher allows, puts less probability on the valid answers (0.798 against 0.856) and ends at
#   0.6623 nats/token — most of the gain of distillation over plain fine-tuning (0.6750) lost.
# * **`"jsd"`** (β 0.5) gives the best held-out NLL here, 0.5889, with the most probability on
#   the valid answers (0.938) and the teacher's upper-case share (0.750); its greedy answer is the
#   most likely one on 91% of held-out prompts (the others 100%): it spreads probability more.
# * **Memory** at the Gemma-2 9B → 2B head pair (4 × 2048 bf16 tokens, forward + backward,
#   compiled on XLA:CPU): 25.7 GiB of temp for the loss on materialised logits, 0.24 GiB fused —
#   1/108. Compiled for other targets (not run) by
#   `python bench/fused_distill_memory.py --target h100` (resp. `--target tpu-v5p`, `tpu-v5e`) in
#   the deviceless environment: H100 0.43 vs 19.6 GiB (1/45), TPU v5p 0.27 vs 11.7 GiB (1/43);
#   on TPU v5e the logits path does not fit its 16 GiB, the fused one needs 0.26 GiB
#   (`bench/results/fused_distill_memory.md`, with `kind="kl"`).
# * **Training**: `jaxnll train --teacher RUN --kd token --fused [--kd-kind ce|kl|reverse_kl|jsd]`
#   runs this fused objective in the application, the student's NLL and the KD term from one
#   pass of its head, packed rows in one pass for all their samples
#   (`bench/results/fused_distill_training.md`).
#
# One seed, one synthetic task, 160 steps of a tiny student: the ranking of the divergences is
# this run's; the equality of `"ce"`, `"kl"` and the logits path is exact by construction.
