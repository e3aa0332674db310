"""The elm-jax command line: t5x-style gin flags, every gin model file, errors without tracebacks."""

import glob
import json
import os
import shutil
import subprocess
import sys

import gin
import pytest

from elm_jax.checkpoints import hf
from elm_jax.commands import cli, gin_utils
from elm_jax.models.t5_config import T5Config
from tests.helpers.checkpoints import write_legacy_t5x
from tests.helpers.golden import GOLDEN_DIR

MODEL_FILES = sorted(glob.glob(os.path.join(gin_utils.GIN_CONFIGS_DIR, "models", "*.gin")))
EXPECTED = {  # file -> (emb_dim, encoder layers, vocab, gated, tied)
    "t5_1_1_tiny": (32, 2, 320, True, False),
    "t5_1_1_mini": (64, 2, 1024, True, False),
    "t5_1_1_small": (512, 8, 32128, True, False),
    "t5_1_1_base": (768, 12, 32128, True, False),
    "t5_1_1_large": (1024, 24, 32128, True, False),
    "t5_1_1_xl": (2048, 24, 32128, True, False),
    "t5_1_1_xxl": (4096, 24, 32128, True, False),
    "mt5_small": (512, 8, 250112, True, False),
    "mt5_xl": (2048, 24, 250112, True, False),
    "t5_base_original": (768, 12, 32128, False, True),
    "t5_tiny_original": (32, 2, 320, False, True),
}


@pytest.fixture(autouse=True)
def _fresh_gin():
  """Each test starts from, and leaves behind, an empty gin config."""
  gin.clear_config()
  yield
  gin.clear_config()


def test_split_gin_flags_t5x_forms():
  rest, flags = gin_utils.split_gin_flags([
      "score", "--gin_file=models/t5_1_1_small.gin", "--checkpoint=x", "--gin_file", "b.gin",
      "--gin.MODEL_DIR='/tmp/m'", "--gin.TRAIN_STEPS=100", "--gin_search_paths=a,b", "--batch_size=2"])
  assert rest == ["score", "--checkpoint=x", "--batch_size=2"]
  assert flags.files == ["models/t5_1_1_small.gin", "b.gin"]
  assert flags.bindings == ["MODEL_DIR = '/tmp/m'", "TRAIN_STEPS = 100"]
  assert flags.search_paths == ["a", "b"]


def test_split_gin_flags_quoted_and_repeated():
  # What the shell hands over for --gin.MODEL_DIR='"/tmp/x"' and --gin.NAMES="['a', 'b']".
  rest, flags = gin_utils.split_gin_flags([
      '--gin.MODEL_DIR="/tmp/x"', "--gin.NAMES=['a', 'b']", "--gin.URL='k=v'",
      "--gin_search_paths", "c,,d", "--gin_search_paths=e", "train", "--gin.TRAIN_STEPS=7"])
  assert rest == ["train"]
  assert flags.bindings == ['MODEL_DIR = "/tmp/x"', "NAMES = ['a', 'b']", "URL = 'k=v'",
                            "TRAIN_STEPS = 7"]
  assert flags.search_paths == ["c", "d", "e"]
  gin_utils.parse_gin(flags)
  assert gin.query_parameter("%MODEL_DIR") == "/tmp/x"
  assert gin.query_parameter("%NAMES") == ["a", "b"]
  assert gin.query_parameter("%URL") == "k=v"
  assert gin.query_parameter("%TRAIN_STEPS") == 7


@pytest.mark.parametrize("argv", [["--gin_file"], ["--gin_search_paths"], ["--gin_files=x.gin"]])
def test_gin_file_flag_without_value_or_misspelt(argv):
  with pytest.raises(gin_utils.GinFlagError, match="expected"):
    gin_utils.split_gin_flags(argv)


@pytest.mark.parametrize("flag", ["--gin.NOVALUE", "--gin.=3"])
def test_malformed_binding_flag(flag):
  with pytest.raises(gin_utils.GinFlagError, match="expected --gin.NAME=VALUE"):
    gin_utils.split_gin_flags([flag])


def test_every_model_gin_file_builds_its_config():
  assert {os.path.basename(f)[:-4] for f in MODEL_FILES} == set(EXPECTED)
  for path in MODEL_FILES:
    name = os.path.basename(path)[:-4]
    gin_utils.parse_gin(gin_utils.GinFlags(files=[f"models/{name}.gin"]))
    config = gin_utils.model_config_from_gin()
    assert isinstance(config, T5Config), name
    emb, layers, vocab, gated, tied = EXPECTED[name]
    assert (config.emb_dim, config.num_encoder_layers, config.vocab_size) == (emb, layers, vocab), name
    assert config.is_gated == gated and config.logits_via_embedding == tied, name


@pytest.mark.parametrize("gin_file,golden", [("t5_1_1_tiny", "t5_v1_1"),
                                              ("t5_tiny_original", "t5_original")])
def test_tiny_gin_files_match_the_golden_checkpoints(gin_file, golden):
  gin_utils.parse_gin(gin_utils.GinFlags(files=[f"gin_configs/models/{gin_file}.gin"]))
  with open(os.path.join(GOLDEN_DIR, golden, "config.json")) as f:
    expected = T5Config.from_hf_config(json.load(f))
  assert gin_utils.model_config_from_gin() == expected


def test_search_paths_reach_files_and_their_includes(tmp_path):
  (tmp_path / "mine.gin").write_text("include 'models/t5_1_1_tiny.gin'\nDTYPE = 'bfloat16'\n")
  _, flags = gin_utils.split_gin_flags([f"--gin_search_paths={tmp_path}", "--gin_file=mine.gin"])
  gin_utils.parse_gin(flags)
  config = gin_utils.model_config_from_gin()
  assert (config.emb_dim, config.dtype) == (32, "bfloat16")


def test_bindings_override_macros():
  gin_utils.parse_gin(gin_utils.GinFlags(files=["gin_configs/models/t5_1_1_tiny.gin"],
                                         bindings=["DTYPE = 'bfloat16'"]))
  assert gin_utils.model_config_from_gin().dtype == "bfloat16"


def test_gin_errors_are_clear(tmp_path):
  with pytest.raises(gin_utils.GinFlagError, match="--gin_file=nope.gin: not found"):
    gin_utils.parse_gin(gin_utils.GinFlags(files=["nope.gin"]))
  with pytest.raises(gin_utils.GinFlagError,
                     match=r"--gin.t5_config.T5Config.no_such_field=3: .*no_such_field"):
    gin_utils.parse_gin(gin_utils.GinFlags(files=["models/t5_1_1_tiny.gin"],
                                           bindings=["t5_config.T5Config.no_such_field = 3"]))
  with pytest.raises(gin_utils.GinFlagError, match=r"(?s)--gin.DTYPE=bfloat16: .*needs gin quotes"):
    gin_utils.parse_gin(gin_utils.GinFlags(bindings=["DTYPE = bfloat16"]))
  with pytest.raises(gin_utils.GinFlagError, match=r"--gin.STEPS=\(1,: .*unbalanced"):
    gin_utils.parse_gin(gin_utils.GinFlags(bindings=["STEPS = (1,"]))
  (tmp_path / "broken.gin").write_text("include 'models/no_such_model.gin'\n")
  with pytest.raises(gin_utils.GinFlagError,
                     match=r"--gin_file=.*broken.gin: Unable to open file: models/no_such_model.gin"):
    gin_utils.parse_gin(gin_utils.GinFlags(files=[str(tmp_path / "broken.gin")]))
  (tmp_path / "unbalanced.gin").write_text("DTYPE = ('float32'\n")
  with pytest.raises(gin_utils.GinFlagError, match=r"unbalanced.gin: .*unbalanced brackets"):
    gin_utils.parse_gin(gin_utils.GinFlags(files=[str(tmp_path / "unbalanced.gin")]))
  gin_utils.parse_gin(gin_utils.GinFlags())
  with pytest.raises(gin_utils.GinFlagError, match="no MODEL_CONFIG is bound"):
    gin_utils.model_config_from_gin()
  gin_utils.parse_gin(gin_utils.GinFlags(bindings=["MODEL_CONFIG = 3"]))
  with pytest.raises(gin_utils.GinFlagError, match=r"MODEL_CONFIG: expected @t5_config.T5Config\(\)"):
    gin_utils.model_config_from_gin()


def test_invalid_model_field_names_the_field():
  gin_utils.parse_gin(gin_utils.GinFlags(files=["models/t5_1_1_tiny.gin"],
                                         bindings=["DTYPE = 'float16'"]))
  with pytest.raises(ValueError, match=r"T5Config.dtype: expected one of \['bfloat16', 'float32'\]"):
    gin_utils.model_config_from_gin()


def test_version_and_unknown_command(capsys):
  assert cli.main(["version"]) == 0
  assert "elm_jax" in capsys.readouterr().out
  assert cli.main(["frobnicate"]) == 2
  assert "unknown command 'frobnicate'" in capsys.readouterr().err
  assert cli.main([]) == 2
  assert "COMMAND" in capsys.readouterr().out


def test_cli_gin_errors_exit_2_without_traceback(capsys):
  assert cli.main(["version", "--gin.DTYPE"]) == 2
  assert "elm-jax: error: --gin.DTYPE: expected --gin.NAME=VALUE" in capsys.readouterr().err
  assert cli.main(["version", "--gin_file=models/t5_1_1_tiny.gin", "--gin.DTYPE=bfloat16"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("elm-jax version: error: --gin.DTYPE=bfloat16: ") and "Traceback" not in err


def test_version_starts_without_tensorflow():
  """Start-up stays fast: nothing on the `version` path imports TensorFlow or SeqIO."""
  code = ("import sys; from elm_jax.commands import cli; rc = cli.main(['version']); "
          "assert rc == 0; assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules, "
          "sorted(m for m in sys.modules if m.startswith(('tensorflow', 'seqio')))")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("elm_jax ")


def test_score_a_t5x_checkpoint_with_a_gin_model_file(tmp_path, capsys):
  """A T5X checkpoint has no config.json: the model comes from --gin_file, as in t5x."""
  golden = str(GOLDEN_DIR / "t5_v1_1")
  params = hf.load_hf_checkpoint(golden).params
  ckpt = str(tmp_path / "checkpoint_1100")
  write_legacy_t5x(ckpt, params)
  shutil.copy(os.path.join(golden, "spiece.model"), ckpt)
  out = tmp_path / "out.jsonl"
  args = ["score", f"--checkpoint={ckpt}", f"--input={golden}/rank_input.jsonl", f"--output={out}"]
  assert cli.main(args) == 2
  assert "pass a model gin file" in capsys.readouterr().err
  assert cli.main(args + ["--gin_file=models/t5_1_1_tiny.gin"]) == 0
  reference = [json.loads(l) for l in open(os.path.join(golden, "rank_reference.jsonl"))]
  ours = [json.loads(l) for l in open(out)]
  for o, r in zip(ours, reference):
    assert o["prediction"] == r["prediction"]
    # As in test_score_command.test_scores_match_reference: relative to |score| (up to 430 here,
    # where 1e-4 absolute was half used up).
    assert all(abs(a - b) <= 1e-5 + 1e-5 * abs(b) for a, b in zip(o["scores"], r["scores"])), o
