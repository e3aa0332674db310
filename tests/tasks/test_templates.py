"""Promptsource templates: safe YAML loading, exact renderings in ELM's (source, target) form,
and errors that name the file, the template and the example index."""

import pytest

from elm_jax.errors import UserInputError
from tasks import templates

YAML = """dataset: super_glue
subset: rte
templates:
  aaaa-1111: !Template
    answer_choices: Yes ||| No
    id: aaaa-1111
    jinja: '{{premise}} Question: Does this imply that "{{hypothesis}}"? {{"Yes or no?"}}
      ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: true
      languages:
      - en
      metrics:
      - Accuracy
      original_task: true
    name: does this imply
    reference: ''
  bbbb-2222: !Template
    answer_choices: null
    id: bbbb-2222
    jinja: 'Write a sentence that follows from: {{premise}} ||| {{hypothesis}}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      languages:
      - en
      metrics:
      - BLEU
      original_task: false
    name: generate
    reference: ''
  cccc-3333: !Template
    answer_choices: '{{ option_a }} ||| {{ option_b }}'
    id: cccc-3333
    jinja: '{{ premise }} {% for a, b in zip(["A", "B"], answer_choices) %}{{a}}: {{b}} {% endfor %}|||
      {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: true
      languages:
      - en
      metrics:
      - Accuracy
      original_task: true
    name: options
    reference: ''
"""

EXAMPLE = {"premise": "It rained.", "hypothesis": "The ground is wet.", "label": 1,
           "option_a": "wet", "option_b": "dry"}


@pytest.fixture
def path(tmp_path):
  p = tmp_path / "templates.yaml"
  p.write_text(YAML)
  return str(p)


def test_load_keys_by_name_with_metadata(path):
  loaded = templates.load_templates(path)
  assert list(loaded) == ["does this imply", "generate", "options"]
  t = loaded["does this imply"]
  assert t.id == "aaaa-1111" and t.original_task and t.choices_in_prompt
  assert t.metrics == ["Accuracy"] and t.languages == ["en"]
  assert not loaded["generate"].original_task
  assert templates.dataset_name(path) == ("super_glue", "rte")


def test_rendering_exact(path):
  loaded = templates.load_templates(path)
  t = loaded["does this imply"]
  assert t.get_answer_choices(EXAMPLE) == ["Yes", "No"]
  assert t.apply(EXAMPLE) == (
      'It rained. Question: Does this imply that "The ground is wet."? Yes or no?', "No")
  assert t.apply_parts(EXAMPLE) == [
      'It rained. Question: Does this imply that "The ground is wet."? Yes or no?', "No"]
  g = loaded["generate"]
  assert g.get_answer_choices(EXAMPLE) is None
  assert g.apply(EXAMPLE) == ("Write a sentence that follows from: It rained.",
                              "The ground is wet.")
  o = loaded["options"]
  assert o.get_answer_choices(EXAMPLE) == ["wet", "dry"]
  assert o.apply(EXAMPLE) == ("It rained. A: wet B: dry", "dry")


def test_pipes_inside_fields_are_protected(path):
  t = templates.load_templates(path)["generate"]
  ex = dict(EXAMPLE, premise="a ||| b")
  assert t.apply(ex) == ("Write a sentence that follows from: a ||| b", "The ground is wet.")


def test_truncation_as_promptsource(path):
  t = templates.load_templates(path)["generate"]
  ex = dict(EXAMPLE, premise="word " * 1000)
  source, _ = t.apply(ex)
  assert source.endswith("...") and len(source) < 2100
  source, _ = t.apply(ex, truncate=False)
  assert source.endswith("word")


def test_no_separator_gives_no_target(tmp_path):
  p = tmp_path / "t.yaml"
  p.write_text("dataset: d\ntemplates:\n  u1: !Template\n    name: plain\n    jinja: 'hi {{ x }}'\n")
  t = templates.load_templates(str(p))["plain"]
  assert t.apply({"x": "there"}) == ("hi there", None)


def test_choice_filter_is_deterministic_per_example(tmp_path):
  p = tmp_path / "t.yaml"
  p.write_text("dataset: d\ntemplates:\n  u1: !Template\n    name: pick\n"
               "    jinja: '{{ [\"a\", \"b\", \"c\", \"d\"] | choice }} ||| x'\n")
  t = templates.load_templates(str(p))["pick"]
  first = [t.apply({}, index=i)[0] for i in range(20)]
  assert first == [t.apply({}, index=i)[0] for i in range(20)]
  assert len(set(first)) > 1


def test_missing_field_names_file_template_and_index(path):
  t = templates.load_templates(path)["generate"]
  with pytest.raises(templates.TemplateError) as e:
    t.apply({"premise": "only premise"}, index=7)
  message = str(e.value)
  assert path in message and "'generate'" in message and "example 7" in message
  assert "hypothesis" in message
  assert isinstance(e.value, UserInputError)


def test_missing_field_in_answer_choices(path):
  t = templates.load_templates(path)["options"]
  with pytest.raises(templates.TemplateError, match=r"example 3: field 'answer_choices'"):
    t.apply({"premise": "p", "label": 0, "option_a": "x"}, index=3)


def test_sandbox_blocks_unsafe_attributes(tmp_path):
  p = tmp_path / "t.yaml"
  p.write_text("dataset: d\ntemplates:\n  u1: !Template\n    name: evil\n"
               "    jinja: '{{ x.__class__.__mro__[1].__subclasses__() }} ||| y'\n")
  t = templates.load_templates(str(p))["evil"]
  with pytest.raises(templates.TemplateError, match="'evil': example 0"):
    t.apply({"x": "s"})


def test_malicious_yaml_tag_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  p = tmp_path / "t.yaml"
  p.write_text(f"dataset: d\ntemplates: !!python/object/apply:os.system ['touch {marker}']\n")
  with pytest.raises(templates.TemplateError, match=str(p)):
    templates.load_templates(str(p))
  assert not marker.exists()


def test_template_without_jinja_is_an_error(tmp_path):
  p = tmp_path / "t.yaml"
  p.write_text("dataset: d\ntemplates:\n  u1: !Template\n    name: broken\n")
  with pytest.raises(templates.TemplateError, match=r"template u1: field 'jinja'"):
    templates.load_templates(str(p))


def test_missing_templates_mapping(tmp_path):
  p = tmp_path / "t.yaml"
  p.write_text("dataset: d\n")
  with pytest.raises(templates.TemplateError, match=r"field 'templates'"):
    templates.load_templates(str(p))
