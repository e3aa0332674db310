"""Promptsource templates: load a `templates.yaml` safely and render examples as ELM does.

A promptsource `templates.yaml` has a top-level `dataset:` (and optional `subset:`) and a
`templates:` mapping from uuid to a `!Template` object (`name`, `jinja`, `answer_choices`,
`metadata` as a `!TemplateMetadata`, `reference`, `id`). The custom tags are read with a
`yaml.SafeLoader` subclass that turns them into plain dicts; every other non-standard tag
(e.g. `!!python/object/apply:...`) is refused.

Rendering follows promptsource's `Template.apply` / `get_answer_choices_list`:
- `answer_choices` is rendered first (pipes in string fields escaped), split on `|||`, each
  choice stripped, and the list is exposed to the main template as `answer_choices`;
- with `truncate=True` (promptsource's default) every `}}` becomes
  `| string | truncate(2048) }}`, so a rendered variable longer than 2048 (+5 leeway)
  characters is cut as promptsource cuts it;
- the rendering is split on `|||` and every part stripped.
ELM then uses source = `' '.join(parts[:-1])` and target = `parts[-1]`; `Template.apply`
returns that pair. When a rendering has no `|||` at all, `apply` returns `(parts[0], None)`
(ELM would produce `('', parts[0])`); `Template.apply_parts` gives promptsource's raw list.

The Jinja environment is a `SandboxedEnvironment` with `StrictUndefined` and promptsource's
helpers: the `zip` global (plus `len`), and the `choice`, `most_frequent` and `highlight`
filters. promptsource's `choice` uses the unseeded global `random`; here it draws from a
`random.Random` seeded by (template name, example index), so renderings are reproducible.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Any, Mapping, Optional

import jinja2
import jinja2.sandbox
import yaml

from elm_jax.errors import UserInputError

TEXT_VAR_LENGTH = 2048  # promptsource's truncation length for rendered variables
PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"  # promptsource's stand-in for '|||'
_RNG_VAR = "_elm_template_rng"


class TemplateError(UserInputError):
  """A templates file that cannot be read, or a template that cannot render an example."""


class _TemplateLoader(yaml.SafeLoader):
  """SafeLoader that reads promptsource's `!Template` / `!TemplateMetadata` tags as dicts."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
  """A tagged YAML mapping -> a plain dict (deep)."""
  return loader.construct_mapping(node, deep=True)


_TemplateLoader.add_constructor("!Template", _construct_mapping)
_TemplateLoader.add_constructor("!TemplateMetadata", _construct_mapping)


def _choice(context, choices):
  """promptsource's `choice` filter: one element of `choices`, drawn from the per-example RNG."""
  rng = context.get(_RNG_VAR)
  return (rng if rng is not None else random.Random(0)).choice(list(choices))


def _most_frequent(items):
  """promptsource's `most_frequent` filter: the items that occur most often (all ties)."""
  if not items:
    return None
  counts = collections.Counter(items).most_common()
  top = counts[0][1]
  return [item for item, count in counts if count == top]


def _highlight(text):
  """promptsource's `highlight` filter (HTML for its UI); the text is kept as is here."""
  return text


def _environment() -> jinja2.sandbox.SandboxedEnvironment:
  """The sandboxed Jinja environment with promptsource's helpers and strict undefineds."""
  env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined,
                                            keep_trailing_newline=False)
  env.globals.update(zip=zip, len=len, range=range)
  env.filters["choice"] = jinja2.pass_context(_choice)
  env.filters["most_frequent"] = _most_frequent
  env.filters["highlight"] = _highlight
  return env


_ENV = _environment()


def _escape_pipe(example: Mapping[str, Any]) -> dict[str, Any]:
  """Top-level string fields with '|||' replaced by the protector (as promptsource does)."""
  return {k: v.replace("|||", PIPE_PROTECTOR) if isinstance(v, str) else v
          for k, v in example.items()}


def _unescape_pipe(text: str) -> str:
  """The protector turned back into '|||'."""
  return text.replace(PIPE_PROTECTOR, "|||")


@dataclasses.dataclass(frozen=True)
class Template:
  """One promptsource template; `source` is the file it came from (named in errors)."""
  name: str
  jinja: str
  answer_choices: Optional[str] = None
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  reference: str = ""
  id: str = ""
  source: str = "<templates>"

  @property
  def original_task(self) -> bool:
    """metadata.original_task (False when absent), as promptsource's `TemplateMetadata`."""
    return bool(self.metadata.get("original_task") or False)

  @property
  def choices_in_prompt(self) -> bool:
    """metadata.choices_in_prompt (False when absent)."""
    return bool(self.metadata.get("choices_in_prompt") or False)

  @property
  def metrics(self) -> list[str]:
    """metadata.metrics (empty when absent)."""
    return list(self.metadata.get("metrics") or [])

  @property
  def languages(self) -> list[str]:
    """metadata.languages (empty when absent)."""
    return list(self.metadata.get("languages") or [])

  def _render(self, text: str, variables: Mapping[str, Any], index: int, field: str) -> str:
    """Renders `text` with `variables`; a Jinja failure -> TemplateError naming where."""
    rng = random.Random(f"{self.name}\x00{index}")
    try:
      return _ENV.from_string(text).render(**variables, **{_RNG_VAR: rng})
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError,
            ZeroDivisionError) as e:
      raise TemplateError(
          f"{self.source}: template {self.name!r}: example {index}: field {field!r} failed to "
          f"render: {type(e).__name__}: {e}") from e

  def get_answer_choices(self, example: Mapping[str, Any], index: int = 0) -> Optional[list[str]]:
    """The rendered `answer_choices`, split on '|||' and stripped; None without answer_choices."""
    if self.answer_choices is None:
      return None
    rendered = self._render(self.answer_choices, _escape_pipe(example), index, "answer_choices")
    return [_unescape_pipe(c).strip() for c in rendered.split("|||")]

  def apply_parts(self, example: Mapping[str, Any], index: int = 0,
                  truncate: bool = True) -> list[str]:
    """promptsource's `apply`: the rendering split on '|||', each part stripped."""
    variables = dict(example)
    if self.answer_choices is not None:
      variables["answer_choices"] = self.get_answer_choices(example, index)
    jinja = self.jinja
    if truncate:
      jinja = jinja.replace("}}", f" | string | truncate({TEXT_VAR_LENGTH}) }}}}")
    rendered = self._render(jinja, _escape_pipe(variables), index, "jinja")
    return [_unescape_pipe(part).strip() for part in rendered.split("|||")]

  def apply(self, example: Mapping[str, Any], index: int = 0,
            truncate: bool = True) -> tuple[str, Optional[str]]:
    """ELM's (source, target): (' '.join(parts[:-1]), parts[-1]); (parts[0], None) if no '|||'."""
    parts = self.apply_parts(example, index, truncate)
    if len(parts) < 2:
      return parts[0], None
    return " ".join(parts[:-1]), parts[-1]


def _read_yaml(path: str) -> Any:
  """The YAML document at `path`, read with the tag-restricted safe loader."""
  try:
    with open(path, encoding="utf-8") as f:
      return yaml.load(f, Loader=_TemplateLoader)  # noqa: S506 - SafeLoader subclass
  except OSError as e:
    raise TemplateError(f"{path}: cannot read templates file: {e}") from e
  except yaml.YAMLError as e:
    raise TemplateError(f"{path}: not a valid promptsource templates file "
                        f"(only !Template and !TemplateMetadata tags are allowed): {e}") from e


def load_templates(path: str) -> dict[str, Template]:
  """A promptsource `templates.yaml` -> {template name: Template}, in file order.

  Errors (unreadable file, unknown YAML tag, missing `templates`, a template without `name` or
  `jinja`, two templates with one name) name the file, the template and the field.
  """
  path = str(path)
  document = _read_yaml(path)
  if not isinstance(document, dict) or not isinstance(document.get("templates"), dict):
    raise TemplateError(f"{path}: field 'templates': expected a mapping of uuid -> !Template")
  templates: dict[str, Template] = {}
  for uuid, raw in document["templates"].items():
    if not isinstance(raw, dict):
      raise TemplateError(f"{path}: template {uuid}: expected a !Template mapping, "
                          f"got {type(raw).__name__}")
    for field in ("name", "jinja"):
      if not isinstance(raw.get(field), str):
        raise TemplateError(f"{path}: template {uuid}: field {field!r}: expected a string, "
                            f"got {raw.get(field)!r}")
    name = raw["name"]
    if name in templates:
      raise TemplateError(f"{path}: template {uuid}: field 'name': {name!r} is also the name of "
                          f"template {templates[name].id}")
    answer_choices = raw.get("answer_choices")
    if answer_choices is not None and not isinstance(answer_choices, str):
      raise TemplateError(f"{path}: template {name!r}: field 'answer_choices': expected a "
                          f"string, got {answer_choices!r}")
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
      raise TemplateError(f"{path}: template {name!r}: field 'metadata': expected a "
                          f"!TemplateMetadata mapping, got {metadata!r}")
    templates[name] = Template(name=name, jinja=raw["jinja"], answer_choices=answer_choices,
                               metadata=metadata, reference=str(raw.get("reference") or ""),
                               id=str(raw.get("id", uuid)), source=path)
  return templates


def dataset_name(path: str) -> tuple[str, Optional[str]]:
  """(dataset, subset) declared at the top of a templates file (subset None when absent)."""
  document = _read_yaml(str(path))
  if not isinstance(document, dict) or not isinstance(document.get("dataset"), str):
    raise TemplateError(f"{path}: field 'dataset': expected a string")
  subset = document.get("subset")
  return document["dataset"], (None if subset is None else str(subset))
