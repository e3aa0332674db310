"""The error of a training run that cannot start (bad settings, unreadable tasks) or diverged."""

from elm_jax.errors import UserInputError


class TrainingError(UserInputError):
  """A run that cannot start (bad settings or tasks) or that diverged; names what to change."""
