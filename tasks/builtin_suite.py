"""A built-in miniature of T0's task design, generated from a lexicon and a small grammar.

No download: 8 training datasets with 2-3 prompts each (multiple-choice and generative), 4
held-out task clusters as in T0 (natural-language inference, coreference, sentence completion,
word sense) with 3 prompts each, 2 generative tasks kept back for continual learning, and one
composed instruction that needs two training skills at once. Answers are determined by
construction (e.g. an NLI hypothesis is built to be entailed, contradicted or neutral), labels
are balanced, and wording varies between prompts, so one task does not trivially solve another.

`generate(dataset, prompt, split, num_examples, seed)` is deterministic; an example belongs to
train or validation by a hash of its text, so the splits never overlap (small answer spaces,
like antonyms, repeat examples within a split instead). Each example is {"inputs", "targets", "answer_choices",
"label"} (the last two None for generative prompts).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Iterator

import numpy as np

from elm_jax.errors import UserInputError

NAMES = ["Alice", "Bob", "Carmen", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya"]
PRONOUN = {n: ("she" if n in {"Alice", "Carmen", "Elena", "Grace", "Ines", "Lena", "Nadia", "Priya"}
               else "he") for n in NAMES}
CITIES = ["Paris", "Lagos", "Lima", "Oslo", "Tokyo", "Cairo", "Quito", "Dublin", "Hanoi", "Perth"]
OBJECTS = ["phone", "jacket", "lamp", "bicycle", "kettle", "camera", "backpack", "chair", "watch", "novel"]
POSITIVE = ["wonderful", "excellent", "reliable", "delightful", "sturdy", "superb"]
NEGATIVE = ["terrible", "flimsy", "awful", "disappointing", "broken", "useless"]
TOPICS = {
    "sports": ["match", "coach", "goal", "league", "stadium", "team"],
    "politics": ["election", "minister", "parliament", "vote", "senator", "policy"],
    "science": ["experiment", "laboratory", "molecule", "telescope", "researcher", "theory"],
    "business": ["market", "profit", "company", "investor", "shares", "startup"],
}
ANTONYMS = [("hot", "cold"), ("tall", "short"), ("early", "late"), ("happy", "sad"), ("fast", "slow"),
            ("open", "closed"), ("light", "heavy"), ("loud", "quiet"), ("rich", "poor"), ("young", "old"),
            ("wet", "dry"), ("clean", "dirty"), ("strong", "weak"), ("wide", "narrow"), ("soft", "hard"),
            ("full", "empty"), ("near", "far"), ("thick", "thin"), ("sweet", "sour"), ("brave", "afraid"),
            ("cheap", "costly"), ("safe", "dangerous"), ("smooth", "rough"), ("calm", "angry"), ("first", "last")]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
SYNONYMS = [("bought", "purchased"), ("began", "started"), ("quick", "fast"), ("big", "large"),
            ("helped", "assisted"), ("ended", "finished")]
VERB_PHRASES = ["bought a {o}", "began a trip to {c}", "helped a friend in {c}", "ended a job in {c}"]
# (situation, fitting ending): sentence completion draws distractors from other rows.
SITUATIONS = [("was very hungry, so {p}", "ate a large bowl of soup."),
              ("was tired after work, so {p}", "went to bed early."),
              ("saw dark clouds, so {p}", "took an umbrella."),
              ("missed the bus, so {p}", "walked to the office."),
              ("found a lost wallet, so {p}", "took it to the police."),
              ("had a toothache, so {p}", "called the dentist."),
              ("won the lottery, so {p}", "bought a new house."),
              ("felt cold at night, so {p}", "closed the window.")]
# Coreference: (template with {a} {b} {p}, index of the referent: 0 -> a, 1 -> b)
COREF = [("{a} thanked {b} because {p} had helped with the move.", 1),
         ("{a} apologized to {b} because {p} had arrived late.", 0),
         ("{a} called {b} because {p} needed advice.", 0),
         ("{a} congratulated {b} because {p} had won the race.", 1),
         ("{a} visited {b} because {p} was sick.", 1),
         ("{a} waited for {b} because {p} was slow.", 1)]
# Word sense: word -> two senses, each a list of sentence frames.
SENSES = {
    "bank": (["She sat on the bank of the river.", "Reeds grew along the bank."],
             ["He opened an account at the bank.", "The bank approved the loan."]),
    "bat": (["A bat flew out of the cave.", "The bat sleeps during the day."],
            ["He swung the bat at the ball.", "She bought a new cricket bat."]),
    "match": (["He lit a match in the dark.", "The match burned her fingers."],
              ["Our team won the match.", "The match lasted two hours."]),
    "spring": (["Flowers bloom in spring.", "We travel every spring."],
               ["The spring in the pen broke.", "A metal spring holds the door."]),
    "pitch": (["The players ran onto the pitch.", "Rain flooded the pitch."],
              ["She sang at a high pitch.", "The pitch of the note was low."]),
    "trunk": (["The elephant raised its trunk.", "Its trunk reached the water."],
              ["He packed the trunk of the car.", "The trunk was full of bags."]),
}
IRREGULAR_PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "man": "men",
                     "tooth": "teeth", "person": "people"}
PLURAL_WORDS = ["cat", "box", "city", "bus", "leaf", "dish", "toy", "key", "story", "glass", "fox", "lady",
                "wolf", "brush", "boy", "day", "party", "church", "dress", "shelf", "tree", "road",
                "berry", "class", "match", "wish", "loaf", "baby", "cup", "river"] + list(IRREGULAR_PLURALS)


class SuiteError(UserInputError):
  """An unknown dataset or prompt of the built-in suite."""


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  dataset: str
  prompt: str
  role: str          # train | held_out | continual | composed
  multiple_choice: bool


def _pick(rng, items):
  return items[int(rng.integers(len(items)))]


def _sample(rng, items, k) -> list[str]:
  """k distinct items as plain Python strings."""
  return [str(items[i]) for i in rng.choice(len(items), k, replace=False)]


def _two_names(rng):
  a, b = rng.choice(len(NAMES), 2, replace=False)
  return NAMES[a], NAMES[b]


def _mc(inputs: str, choices: list[str], label: int) -> dict:
  return {"inputs": inputs, "targets": choices[label], "answer_choices": choices, "label": label}


def _gen(inputs: str, target: str) -> dict:
  return {"inputs": inputs, "targets": target, "answer_choices": None, "label": None}


# ------------------------------------------------------------------------ training datasets
def _review(rng):
  positive = bool(rng.integers(2))
  adj = _pick(rng, POSITIVE if positive else NEGATIVE)
  obj, name = _pick(rng, OBJECTS), _pick(rng, NAMES)
  verbs = ["love", "recommend", "enjoy"] if positive else ["regret", "returned", "dislike"]
  text = f"{name} wrote: the {obj} I got was {adj}. I {_pick(rng, verbs)} it."
  return text, positive


def sentiment(prompt, rng):
  text, positive = _review(rng)
  if prompt == "is_positive":
    return _mc(f"{text} Is this review positive?", ["no", "yes"], int(positive))
  return _mc(f"Review: {text}\nDid the writer like the product? Options: good, bad", ["bad", "good"], int(positive))


def _article(rng, topic=None):
  topic = topic or _pick(rng, list(TOPICS))
  words = _sample(rng, TOPICS[topic], 3)
  name, city = _pick(rng, NAMES), _pick(rng, CITIES)
  text = (f"In {city}, {name} spoke about the {words[0]}. Reporters asked about the {words[1]} "
          f"and the {words[2]}.")
  return text, topic, name, words[0]


def topic(prompt, rng):
  text, label, _, _ = _article(rng)
  choices = sorted(TOPICS)
  if prompt == "which_topic":
    return _mc(f"{text} Which section does this article belong to?", choices, choices.index(label))
  return _mc(f"Question: is this about sports, politics, science or business?\n{text}", choices,
             choices.index(label))


def extractive_qa(prompt, rng):
  a, b = _two_names(rng)
  ca, cb = _sample(rng, CITIES, 2)
  oa = _pick(rng, OBJECTS)
  context = f"{a} lives in {ca}. {b} lives in {cb}. {a} owns a {oa}."
  if rng.integers(2):
    question, answer = f"Where does {b} live?", cb
  else:
    question, answer = f"What does {a} own?", f"a {oa}"
  if prompt == "answer_from_context":
    return _gen(f"{context}\nQuestion: {question}\nAnswer:", answer)
  return _gen(f"Read and answer. {question} Text: {context}", answer)


def mc_reading(prompt, rng):
  a = _pick(rng, NAMES)
  situation, ending = SITUATIONS[int(rng.integers(len(SITUATIONS)))]
  story = f"{a} {situation.format(p=PRONOUN[a])} {ending}"
  cause = situation.split(",")[0]
  wrong = [s.split(",")[0] for s, _ in SITUATIONS if s.split(",")[0] != cause]
  options = [cause] + _sample(rng, wrong, 2)
  order = rng.permutation(3)
  options = [options[i] for i in order]
  label = int(np.where(order == 0)[0][0])
  options = [f"{a} {o}" for o in options]
  if prompt == "why_question":
    return _mc(f"{story}\nWhy did this happen?\nOptions: " + " | ".join(options), options, label)
  return _mc(f"Story: {story} What was the reason?", options, label)


def paraphrase(prompt, rng):
  a = _pick(rng, NAMES)
  verb_phrase = _pick(rng, VERB_PHRASES).format(o=_pick(rng, OBJECTS), c=_pick(rng, CITIES))
  first = f"{a} {verb_phrase} yesterday."
  same = bool(rng.integers(2))
  if same:
    second = first
    for x, y in SYNONYMS:
      second = second.replace(f" {x} ", f" {y} ")
    second = second.replace("yesterday", "the day before")
  else:
    b = _pick(rng, [n for n in NAMES if n != a])
    second = f"{b} {verb_phrase} yesterday."
  if prompt == "same_meaning":
    return _mc(f'"{first}" and "{second}" Do these mean the same thing?', ["no", "yes"], int(same))
  return _mc(f"Sentence 1: {first}\nSentence 2: {second}\nParaphrase or not?",
             ["not paraphrase", "paraphrase"], int(same))


def title_generation(prompt, rng):
  text, label, name, word = _article(rng)
  title = f"{label.capitalize()}: {name} on the {word}"
  if prompt == "write_title":
    return _gen(f"{text}\nWrite a title for this article.", title)
  return _gen(f"Give this news story a headline: {text}", title)


def counting(prompt, rng):
  n = int(rng.integers(1, 7))
  items = _sample(rng, OBJECTS, n)
  if prompt == "how_many":
    return _gen(f"How many things are in this list: {', '.join(items)}?", NUMBER_WORDS[n])
  choices = NUMBER_WORDS[1:7]
  return _mc(f"Count the items: {', '.join(items)}. Answer with a number word.", choices, n - 1)


def antonyms(prompt, rng):
  x, y = ANTONYMS[int(rng.integers(len(ANTONYMS)))]
  if rng.integers(2):
    x, y = y, x
  if prompt == "opposite_of":
    return _gen(f"What is the opposite of {x}?", y)
  distractors = [w for pair in ANTONYMS for w in pair if w not in (x, y)]
  choices = [y] + _sample(rng, distractors, 2)
  order = rng.permutation(3)
  return _mc(f"Pick the antonym of '{x}'.", [choices[i] for i in order], int(np.where(order == 0)[0][0]))


# ------------------------------------------------------------------------ held-out clusters
def nli(prompt, rng):
  a = _pick(rng, NAMES)
  city = _pick(rng, CITIES)
  obj = _pick(rng, OBJECTS)
  premise = f"{a} bought a {obj} in {city} on Monday."
  kind = int(rng.integers(3))  # 0 entailment, 1 neutral, 2 contradiction
  if kind == 0:
    hypothesis = _pick(rng, [f"{a} was in {city} on Monday.", f"{a} bought something.",
                             f"Someone bought a {obj}."])
  elif kind == 1:
    hypothesis = _pick(rng, [f"{a} likes the {obj}.", f"{a} lives in {city}.",
                             f"The {obj} was expensive."])
  else:
    other = _pick(rng, [c for c in CITIES if c != city])
    hypothesis = _pick(rng, [f"{a} was in {other} all of Monday.", f"{a} bought nothing on Monday."])
  if prompt == "can_we_infer":
    return _mc(f"Suppose {premise} Can we infer that \"{hypothesis}\"? Yes, no, or maybe?",
               ["Yes", "Maybe", "No"], kind)
  if prompt == "gpt3_style":
    return _mc(f"{premise}\nQuestion: {hypothesis} True, False, or Neither?",
               ["True", "Neither", "False"], kind)
  return _mc(f"Given that {premise} Therefore, it must be true that \"{hypothesis}\"? "
             "Always, sometimes, or never?", ["Always", "Sometimes", "Never"], kind)


def coreference(prompt, rng):
  a, b = _two_names(rng)
  while PRONOUN[a] != PRONOUN[b]:  # same pronoun, so only the verb decides
    a, b = _two_names(rng)
  sentence, referent = COREF[int(rng.integers(len(COREF)))]
  text = sentence.format(a=a, b=b, p=PRONOUN[a])
  choices = [a, b]
  if prompt == "who_is_pronoun":
    return _mc(f"{text} In this sentence, who does \"{PRONOUN[a]}\" refer to?", choices, referent)
  if prompt == "replace_pronoun":
    return _mc(f"{text} Replace \"{PRONOUN[a]}\" with the right name.", choices, referent)
  candidate = int(rng.integers(2))
  return _mc(f"{text} Does \"{PRONOUN[a]}\" mean {choices[candidate]}?", ["no", "yes"],
             int(candidate == referent))


def sentence_completion(prompt, rng):
  a = _pick(rng, NAMES)
  index = int(rng.integers(len(SITUATIONS)))
  situation, ending = SITUATIONS[index]
  start = f"{a} {situation.format(p=PRONOUN[a])}"
  wrong = [e for i, (_, e) in enumerate(SITUATIONS) if i != index]
  options = [ending] + _sample(rng, wrong, 3)
  order = rng.permutation(4)
  options = [options[i] for i in order]
  label = int(np.where(order == 0)[0][0])
  if prompt == "how_ends":
    listed = "\n".join(f"Ending {i + 1}: {o}" for i, o in enumerate(options))
    return _mc(f"{start} ...\nHow does this end?\n{listed}", [f"Ending {i + 1}" for i in range(4)], label)
  if prompt == "complete_first_then":
    return _mc(f"Complete the description: {start} ...", options, label)
  return _mc(f"What happens next? {start}", options, label)


def word_sense(prompt, rng):
  word = _pick(rng, sorted(SENSES))
  first_sense = int(rng.integers(2))
  same = bool(rng.integers(2))
  second_sense = first_sense if same else 1 - first_sense
  s1, s2 = rng.permutation(2)
  one, two = SENSES[word][first_sense][s1], SENSES[word][second_sense][s2 if same else s1]
  if prompt == "same_sense":
    return _mc(f"Sentence A: {one}\nSentence B: {two}\nIs '{word}' used in the same sense?",
               ["No", "Yes"], int(same))
  if prompt == "polysemous":
    return _mc(f"The word '{word}' has several meanings. \"{one}\" / \"{two}\" Same meaning?",
               ["False", "True"], int(same))
  return _mc(f"Homework: decide if '{word}' means the same in '{one}' and '{two}'.",
             ["different", "same"], int(same))


# ------------------------------------------------------------------------ continual, composed
def _plural(word: str) -> str:
  if word in IRREGULAR_PLURALS:
    return IRREGULAR_PLURALS[word]
  if word.endswith("y") and word[-2] not in "aeiou":
    return word[:-1] + "ies"
  if word.endswith("f"):
    return word[:-1] + "ves"
  if word.endswith(("s", "x", "sh", "ch")):
    return word + "es"
  return word + "s"


def make_plural(prompt, rng):
  adjective = _pick(rng, [a for pair in ANTONYMS for a in pair])
  word = _pick(rng, PLURAL_WORDS)
  return _gen(f"Plural of: {adjective} {word}", f"{adjective} {_plural(word)}")


def reverse_words(prompt, rng):
  words = _sample(rng, ["red", "blue", "green", "gold", "pink", "gray", "white"], 3)
  return _gen(f"Reverse the order: {' '.join(words)}", " ".join(reversed(words)))


def titled_sentiment(prompt, rng):
  text, label, name, word = _article(rng)
  positive = bool(rng.integers(2))
  text += f" Readers called it {_pick(rng, POSITIVE if positive else NEGATIVE)}."
  title = f"{label.capitalize()}: {name} on the {word}"
  return _gen(f"{text}\nWrite a title for this article, then say if the reaction was good or bad.",
              f"{title} | {'good' if positive else 'bad'}")


_GENERATORS: dict[str, tuple[Callable, str, dict[str, bool]]] = {
    # dataset: (generator, role, {prompt: multiple choice?})
    "sentiment": (sentiment, "train", {"is_positive": True, "rate_review": True}),
    "topic": (topic, "train", {"which_topic": True, "topic_question_first": True}),
    "extractive_qa": (extractive_qa, "train", {"answer_from_context": False, "read_and_answer": False}),
    "mc_reading": (mc_reading, "train", {"why_question": True, "what_reason": True}),
    "paraphrase": (paraphrase, "train", {"same_meaning": True, "paraphrase_or_not": True}),
    "title_generation": (title_generation, "train", {"write_title": False, "headline": False}),
    "counting": (counting, "train", {"how_many": False, "count_choices": True}),
    "antonyms": (antonyms, "train", {"opposite_of": False, "pick_antonym": True}),
    "nli": (nli, "held_out", {"can_we_infer": True, "gpt3_style": True, "must_be_true": True}),
    "coreference": (coreference, "held_out", {"who_is_pronoun": True, "replace_pronoun": True,
                                              "does_pronoun_mean": True}),
    "sentence_completion": (sentence_completion, "held_out", {"how_ends": True, "complete_first_then": True,
                                                              "what_happens_next": True}),
    "word_sense": (word_sense, "held_out", {"same_sense": True, "polysemous": True, "homework": True}),
    "make_plural": (make_plural, "continual", {"plural_of": False}),
    "reverse_words": (reverse_words, "continual", {"reverse_order": False}),
    "titled_sentiment": (titled_sentiment, "composed", {"title_then_reaction": False}),
}
COMPOSED_FROM = {"titled_sentiment": ("title_generation", "sentiment")}
SUITE = [PromptSpec(d, p, role, mc) for d, (_, role, prompts) in _GENERATORS.items()
         for p, mc in prompts.items()]


def task_name(dataset: str, prompt: str) -> str:
  return f"builtin_{dataset}_{prompt}"


def prompts_of(dataset: str) -> list[str]:
  if dataset not in _GENERATORS:
    raise SuiteError(f"built-in suite: unknown dataset {dataset!r}; expected one of {sorted(_GENERATORS)}")
  return list(_GENERATORS[dataset][2])


def generate(dataset: str, prompt: str, split: str, num_examples: int, seed: int = 0) -> list[dict]:
  """Deterministic examples of one (dataset, prompt); no example is in both splits."""
  if prompt not in prompts_of(dataset):
    raise SuiteError(f"built-in suite: dataset {dataset!r} has no prompt {prompt!r}; expected one "
                     f"of {prompts_of(dataset)}")
  if split not in ("train", "validation"):
    raise SuiteError(f"built-in suite: split {split!r}; expected 'train' or 'validation'")
  # One stream per dataset; each example goes to validation when a hash of its text says so
  # (1 in 5), so the two splits never share an example, for any prompt.
  rng = np.random.default_rng([zlib.crc32(dataset.encode()), seed])
  generator = _GENERATORS[dataset][0]
  out, draws = [], 0
  while len(out) < num_examples:
    example = generator(prompt, rng)
    draws += 1
    key = f"{example['inputs']}\x00{example['targets']}".encode()
    if (zlib.crc32(key) % 5 == 0) == (split == "validation"):
      out.append(example)
    if draws > 100 * num_examples + 1000:
      raise SuiteError(f"built-in suite: {dataset}/{prompt} produced too few {split} examples")
  return out


def all_text(num_examples_per_prompt: int = 200) -> Iterator[str]:
  """Every input and target of every prompt (train split), for vocabulary training."""
  for spec in SUITE:
    for example in generate(spec.dataset, spec.prompt, "train", num_examples_per_prompt):
      yield example["inputs"]
      yield example["targets"]
      for choice in example["answer_choices"] or ():
        yield choice


def roles() -> dict[str, list[PromptSpec]]:
  out: dict[str, list[PromptSpec]] = {}
  for spec in SUITE:
    out.setdefault(spec.role, []).append(spec)
  return out


def describe(spec: PromptSpec) -> str:
  kind = "multiple choice" if spec.multiple_choice else "generative"
  extra = f" (composes {', '.join(COMPOSED_FROM[spec.dataset])})" if spec.dataset in COMPOSED_FROM else ""
  return f"{task_name(spec.dataset, spec.prompt)}: {spec.role}, {kind}{extra}"
