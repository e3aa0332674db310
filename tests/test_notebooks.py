"""The notebooks run: the quickstart end to end on CPU at its smallest budget, and the at-scale
notebook against a small library (the one the quickstart built), each headless with nbclient
in a fresh kernel; a cell error fails the test. Parameters are overridden as papermill does it:
a cell injected after the one tagged `parameters`. The committed notebooks carry no outputs."""

import json
import os
import shutil

import nbclient  # nbclient, nbformat and ipykernel: the `test` extra of pyproject.toml
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = {name: os.path.join(REPO, "notebooks", name) for name in ("quickstart.ipynb", "library_at_scale.ipynb")}


def with_parameters(path: str, parameters: dict):
  """The notebook at `path` with a cell assigning `parameters` after its `parameters` cell."""
  book = nbformat.read(path, as_version=4)
  tagged = [i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{path}: expected one cell tagged 'parameters', found {len(tagged)}"
  source = "# Parameters injected by tests/test_notebooks.py\n" + "".join(
      f"{name} = {value!r}\n" for name, value in parameters.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  book.cells.insert(tagged[0] + 1, cell)
  return book


def execute(book, cwd: str, timeout: int):
  """Runs every cell in a fresh python3 kernel started in `cwd`; raises CellExecutionError (with
  the cell and its traceback) at the first cell that fails. Returns the executed notebook."""
  client = nbclient.NotebookClient(book, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": cwd}})
  client.execute()
  return book


def _text(book) -> str:
  """Everything the cells printed."""
  return "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
  out = tmp_path_factory.mktemp("quickstart")
  book = execute(with_parameters(NOTEBOOKS["quickstart.ipynb"], {"BUDGET": "test", "OUT": str(out / "run")}),
                 str(out), timeout=600)
  return out / "run", book


@pytest.mark.slow
def test_quickstart_runs_every_step(quickstart):
  out, book = quickstart
  text = _text(book)
  assert "JAX backend 'cpu'" in text and "elm_jax is installed" in text
  assert "scores (8, 4, 3) (experts, examples, choices)" in text  # 8 experts, 4 examples, 3 choices
  library = json.loads((out / "library" / "manifest.json").read_text())
  assert len(library["experts"]) == 9 and library["experts"]["roe_top2"]["provenance"]["method"] == "uniform"
  assert os.listdir(out / "baseline_library" / "experts") == ["multitask"]
  images = [o for c in book.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 1  # the plot of every expert against the baseline


@pytest.mark.slow
def test_library_at_scale_runs_on_a_small_library(quickstart, tmp_path):
  library = tmp_path / "library"
  shutil.copytree(quickstart[0] / "library", library)
  parameters = {"LIBRARY": str(library), "OUTPUT_DIR": str(tmp_path / "eval"), "MIXTURE": "builtin_held_out",
                "SETUP": "builtin", "MAX_EXAMPLES": 4, "TARGET": "builtin_word_sense_same_sense_score_eval",
                "EMBEDDER": "bm25", "TOP_K": 2, "MERGED": "same_sense_top2"}
  book = execute(with_parameters(NOTEBOOKS["library_at_scale.ipynb"], parameters), str(tmp_path), timeout=600)
  text = _text(book)
  assert "9 experts" in text and "library verified" in text and "12 prompts x 9 experts" in text
  report = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert report["run"]["task"] == "builtin_held_out" and len(report["tasks"]) == 12
  manifest = json.loads((library / "manifest.json").read_text())
  merged_from = manifest["experts"]["same_sense_top2"]["provenance"]["merged_from"]
  assert len(merged_from) == 2 and set(merged_from) <= set(manifest["experts"])
  assert sum(1 for line in text.splitlines() if line.startswith(("builtin_", "roe_top2", "same_sense_top2"))
             and " accuracy " in line) == 3  # the two merged experts and the merge, on the target


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_committed_notebooks_have_no_outputs(name):
  book = nbformat.read(NOTEBOOKS[name], as_version=4)
  nbformat.validate(book)
  for i, cell in enumerate(book.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{name}: cell {i} has stored outputs"
  assert ["parameters"] in [c.metadata.get("tags") for c in book.cells]
