"""The base of every error a user can cause (bad file, field or flag); the CLI prints these
as one line instead of a traceback."""


class UserInputError(ValueError):
  """Bad input from the user: the message names the file, the field and what was expected."""
