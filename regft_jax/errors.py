"""The one base class for problems with a user's inputs (config values, files, meshes).

Entry points catch `UserInputError` and print its message as a single line, without a traceback;
every message names the offending key, file, tensor or value.
"""


class UserInputError(ValueError):
    """A bad config value, file, tensor or mesh; the message says which and what was expected."""
