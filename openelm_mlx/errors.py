class OpenELMError(Exception):
    """A problem with the user's input: the CLI prints the message alone and exits 1."""
