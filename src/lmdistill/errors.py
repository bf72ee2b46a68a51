"""The one exception type for errors a user can cause and fix."""


class LmdistillError(Exception):
    """A problem with the user's input (config, data, model, cache) and what to do about it.

    The message is a single line: what is wrong, then what to do.
    """
