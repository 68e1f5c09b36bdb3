"""Bad input to ``jaxnll train | eval | bench`` (jaxnll/cli.py): one table of command lines, each
refused with exit status 2 and one line on stderr naming the flag or the file (and line), with
no traceback, before any model is built (before the benchmark runs, for ``bench``)."""

import json
import os
import shutil

import jax
import pytest

from jaxnll import cli, parallel, train
from jaxnll.train import data as data_lib
from jaxnll.train import loop
from jaxnll.train.model import ModelConfig

TINY = ["--d-model", "16", "--layers", "1", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Paths the table refers to by name: data files, a trained run, broken copies of it."""
  root = tmp_path_factory.mktemp("inputs")
  p = {"root": str(root)}
  good = root / "good.jsonl"
  data_lib.write_jsonl(data_lib.embedded_examples("all")[::70], good)  # 50 records
  p["good"] = str(good)
  lines = good.read_bytes().splitlines(keepends=True)
  (root / "latin1.jsonl").write_bytes(lines[0] + b'{"prompt": "caf\xe9", "response": "x"}\n')
  (root / "badjson.jsonl").write_bytes(lines[0] + b'{"prompt": "a", "response": \n')
  (root / "five.jsonl").write_bytes(b"".join(lines[:5]))
  (root / "a_file").write_text("not a directory")
  (root / "notrun").mkdir()
  (root / "notrun" / "thesis.tex").write_text("precious")
  (root / "csvdir").mkdir()
  (root / "hf").mkdir()  # a model folder: a config.json, but not a jaxnll run
  (root / "hf" / "config.json").write_text('{"model_type": "llama", "hidden_size": 16}')
  run = root / "run"
  config = train.RunConfig(
    model=ModelConfig(d_model=16, num_layers=1, num_heads=4, d_ff=48),
    batch=data_lib.BatchSpec(rows=16),
    steps=2,
    data=str(good),
    eval_every=0,
    table_rows=0,
  )
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  train.fit(config, str(run), mesh=mesh, progress=False, log=lambda s: None)
  for name, edit in (
    ("truncated", lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:40])),
    ("unknown_key", lambda d: _add_key(d / "config.json")),
    ("corrupt_ckpt", _corrupt_checkpoint),
    ("arrays_missing", _remove_array_data),
  ):
    shutil.copytree(run, root / name)
    edit(root / name)
  names = ("run", "truncated", "unknown_key", "corrupt_ckpt", "arrays_missing")
  p.update({k: str(root / k) for k in names})
  p.update({k: str(root / f"{k}.jsonl") for k in ("latin1", "badjson", "five")})
  p.update({k: str(root / k) for k in ("a_file", "notrun", "csvdir", "hf")})
  return p


def _add_key(path):
  d = json.loads(path.read_text())
  d["train"]["learning_rat"] = 0.1
  path.write_text(json.dumps(d))


def _corrupt_checkpoint(run_dir):
  for dirpath, _, names in os.walk(run_dir / "checkpoints"):
    for name in names:
      with open(os.path.join(dirpath, name), "wb") as f:
        f.write(b"\x00garbage")


def _remove_array_data(run_dir):
  """The checkpoint's array chunks gone (a partial copy): TensorStore's error then carries
  the repr of a bound pybind11 method, which the message must not."""
  for dirpath, dirnames, _ in os.walk(run_dir / "checkpoints"):
    if "d" in dirnames and dirpath.endswith("ocdbt.process_0"):
      shutil.rmtree(os.path.join(dirpath, "d"))


T = ["train", "--out", "{root}/new", *TINY]  # a valid train command line to break
D = ["--data", "{good}"]

#: (command line, fragment of the one-line error). ``{name}`` is a path of :func:`files`.
CASES = [
  # train: flag domains (argparse, before anything is imported or built)
  ([*T, "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
  ([*T, "--batch-size", "-4"], "argument --batch-size: must be an integer >= 1"),
  ([*T, "--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
  ([*T, "--steps", "-5"], "argument --steps: must be an integer >= 1"),
  ([*T, "--steps", "ten"], "argument --steps: must be an integer >= 1, got 'ten'"),
  ([*T, "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
  ([*T, "--lr", "inf"], "argument --lr: must be a finite number > 0, got 'inf'"),
  ([*T, "--lr", "0"], "argument --lr: must be a finite number > 0"),
  ([*T, "--lr=-1e-3"], "argument --lr: must be a finite number > 0"),
  ([*T, "--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
  ([*T, "--eval-every", "-1"], "argument --eval-every: must be an integer >= 0"),
  ([*T, "--table-rows", "-1"], "argument --table-rows: must be an integer >= 0"),
  ([*T, "--accum", "0"], "argument --accum: must be an integer >= 1"),
  ([*T, "--d-model", "0"], "argument --d-model: must be an integer >= 1"),
  ([*T, "--layers", "0"], "argument --layers: must be an integer >= 1"),
  ([*T, "--num-processes", "0"], "argument --num-processes: must be an integer >= 1"),
  ([*T, "--process-id", "-1"], "argument --process-id: must be an integer >= 0"),
  ([*T, "--mesh", "foo=8"], "unknown mesh axis 'foo' in 'foo=8'; valid axes: data, model"),
  ([*T, "--mesh", "data=4,tensor=2"], "unknown mesh axis 'tensor'"),
  ([*T, "--mesh", "data"], "argument --mesh: mesh must look like 'data=4,model=2'"),
  ([*T, "--loss", "causal"], "argument --loss: invalid choice: 'causal'"),
  ([*T, "--bogus"], "unrecognized arguments: --bogus"),
  (["train", "--out", "{a_file}", *TINY], "argument --out: {a_file} is a file, not a directory"),
  # train: checked by the run loop's set-up, before any model is built
  ([*T, *D, "--accum", "3"], "batch rows (16) must be divisible by accum (3)"),
  ([*T, *D, "--mesh", "data=3"], "has 3 devices, but there are 8"),
  ([*T, "--data", "{latin1}"], "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column 16)"),
  ([*T, "--data", "{badjson}"], "badjson.jsonl:2: invalid JSON"),
  ([*T, "--data", "{five}"], "five.jsonl: 5 record(s); every tenth record is held out"),
  ([*T, "--data", "{root}/missing.jsonl"], "missing.jsonl: no such file"),
  (["train", "--out", "{notrun}", *TINY, *D], "is not empty and is not a jaxnll run"),
  (["train", "--out", "{run}", *TINY, *D], "holds a jaxnll run: pass --resume to continue it"),
  (["train", "--out", "{hf}", *TINY, *D, "--overwrite"], "{hf} is not empty and is not a jaxnll"),
  (["train", "--out", "{hf}", *TINY, *D], "{hf} is not empty and is not a jaxnll run"),
  (["train", "--out", "{run}", *TINY, "--resume", "--overwrite"], "exclude each other"),
  (["train", "--out", "{root}/nothing", *TINY, "--resume"], "no run to resume"),
  (["train", "--out", "{truncated}", *TINY, "--resume"], "truncated/config.json:3: invalid JSON"),
  (["train", "--out", "{unknown_key}", *TINY, "--resume"], "unknown key(s) ['learning_rat'] in"),
  ([*T, *D, "--kd-weight", "0.5"], "--kd-weight need --teacher RUN_DIR"),
  # eval
  (["eval", "--run", "{run}", "--out", "{csvdir}"], "argument --out: {csvdir} is a directory"),
  (["eval", "--run", "{run}", "--out", "{root}/no/such/x.csv"], "no such directory"),
  (["eval", "--run", "{run}"], "the following arguments are required: --out"),
  (["eval", "--run", "{notrun}", "--out", "{root}/x.csv"], "notrun/config.json: no such file"),
  (["eval", "--run", "{unknown_key}", "--out", "{root}/x.csv"], "unknown key(s)"),
  # bench: checked while parsing, before the benchmark runs
  (["bench", "--out", "{a_file}"], "argument --out: {a_file} is a file, not a directory"),
  (["bench", "--fractions", "0"], "argument --fractions: must be comma-separated fractions"),
  (["bench", "--fractions", "1,1.5"], "got '1.5' in '1,1.5'"),
  (["bench", "--fractions", "half"], "argument --fractions: must be comma-separated"),
  (["bench", "--fractions", ","], "must list at least one fraction"),
  (["bench", "--repeats", "0"], "argument --repeats: must be an integer >= 1"),
  (["bench", "--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
  (["bench", "--tokens", "0x128"], "argument --tokens: must be BxT with B, T >= 1"),
  (["bench", "--tokens", "2by128"], "argument --tokens: must be BxT"),
  (["bench", "--budget-s", "-1"], "argument --budget-s: must be a finite number > 0"),
]

#: Cases whose error can only be seen by reading the checkpoint (the model's shape is needed).
CHECKPOINT_CASES = [
  (["train", "--out", "{corrupt_ckpt}", *TINY, "--resume"], "cannot restore the checkpoint"),
  (["eval", "--run", "{corrupt_ckpt}", "--out", "{root}/x.csv"], "cannot restore the checkpoint"),
  (["train", "--out", "{arrays_missing}", *TINY, "--resume"], "cannot restore the checkpoint"),
]


def _run(argv, files, capsys):
  argv = [a.format(**files) for a in argv]
  try:
    code = cli.main(argv)
  except SystemExit as e:  # argparse errors
    code = e.code
  return code, capsys.readouterr().err


def _check(argv, fragment, files, capsys):
  code, err = _run(argv, files, capsys)
  assert code == 2, (code, err)
  assert err.endswith("\n") and err.count("\n") == 1, err  # exactly one line
  assert "Traceback" not in err
  assert fragment.format(**files) in err, err


@pytest.mark.parametrize(
  "argv, fragment", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES]
)
def test_bad_input_is_one_line_before_any_model(argv, fragment, files, capsys, monkeypatch):
  def no_model(*a, **k):
    raise AssertionError("a model was built for a bad input")

  monkeypatch.setattr(loop, "build_trainer", no_model)
  monkeypatch.setattr("jaxnll.bench.run", no_model)
  _check(argv, fragment, files, capsys)


@pytest.mark.parametrize(
  "argv, fragment", CHECKPOINT_CASES, ids=["train", "eval", "train-arrays-missing"]
)
def test_corrupted_checkpoint_is_one_line(argv, fragment, files, capsys):
  _check(argv, fragment, files, capsys)
  err = _run(argv, files, capsys)[1]
  assert "pybind" not in err and "<bound method" not in err and " at 0x" not in err, err


def test_refused_directories_are_untouched(files, capsys):
  before = {p: sorted(os.listdir(files[p])) for p in ("notrun", "run", "hf")}
  for argv, _ in CASES:
    if argv[:2] == ["train", "--out"] and argv[2] in ("{notrun}", "{run}", "{hf}"):
      _run(argv, files, capsys)
  assert {p: sorted(os.listdir(files[p])) for p in before} == before
  assert open(os.path.join(files["notrun"], "thesis.tex")).read() == "precious"
