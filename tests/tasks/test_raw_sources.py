"""Raw examples from JSONL, JSON, CSV/TSV and a TFDS dataset prepared offline in a temp dir."""

import json

import pytest

from tasks import raw_sources as raw


def test_jsonl_json_csv_tsv(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"premise": "p", "label": 1}\n\n{"premise": "q", "label": 0}\n')
  (tmp_path / "a.json").write_text(json.dumps({"examples": [{"x": 1}, {"x": 2}]}))
  (tmp_path / "a.csv").write_text("premise,label\np,1\n\"q, r\",0\n")
  (tmp_path / "a.tsv").write_text("premise\tlabel\np\t1\n")
  assert raw.read_raw(str(tmp_path / "a.jsonl")) == [{"premise": "p", "label": 1}, {"premise": "q", "label": 0}]
  assert raw.read_raw(str(tmp_path / "a.json"), limit=1) == [{"x": 1}]
  assert raw.read_raw(str(tmp_path / "a.csv"))[1] == {"premise": "q, r", "label": "0"}
  assert raw.read_raw(str(tmp_path / "a.tsv")) == [{"premise": "p", "label": "1"}]


def test_bad_files_name_file_and_line(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"a": 1}\n[1, 2]\n')
  with pytest.raises(raw.RawDataError, match="bad.jsonl:2: expected a JSON object"):
    raw.read_raw(str(tmp_path / "bad.jsonl"))
  (tmp_path / "bad.csv").write_text("a,b\n1,2,3\n")
  with pytest.raises(raw.RawDataError, match="bad.csv:2: expected 2 columns"):
    raw.read_raw(str(tmp_path / "bad.csv"))
  with pytest.raises(raw.RawDataError, match="missing.jsonl: file not found"):
    raw.read_raw(str(tmp_path / "missing.jsonl"))
  with pytest.raises(raw.RawDataError, match="unknown source"):
    raw.read_raw(str(tmp_path / "x.parquet"))
  with pytest.raises(raw.RawDataError, match="needs data_dir"):
    raw.read_raw("tfds:super_glue/cb")


def test_tfds_dataset_prepared_offline(tmp_path):
  import tensorflow_datasets as tfds

  class TinyNli(tfds.core.GeneratorBasedBuilder):
    # A one-part module name: tfds looks for a builder's code beside a package's resources
    # (`tests.tasks...`), which needs the importlib_resources backport on Python 3.11.
    __module__ = "tiny_nli_builder"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "premise": tfds.features.Text(), "hypothesis": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=["entailment", "neutral", "contradiction"])}))

    def _split_generators(self, dl_manager):
      return {"validation": self._generate_examples()}

    def _generate_examples(self):
      for i in range(3):
        yield i, {"premise": f"p{i}", "hypothesis": f"h{i}", "label": i}

  TinyNli(data_dir=str(tmp_path)).download_and_prepare()
  rows = raw.read_raw("tfds:tiny_nli", split="validation", data_dir=str(tmp_path))
  assert sorted((r["premise"], r["label"]) for r in rows) == [("p0", 0), ("p1", 1), ("p2", 2)]
  with pytest.raises(raw.RawDataError, match="cannot load TFDS dataset 'not_prepared'"):
    raw.read_raw("tfds:not_prepared", split="train", data_dir=str(tmp_path))
