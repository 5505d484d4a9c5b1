class OpenELMError(Exception):
    """A problem with the user's input: the CLI prints the message alone and exits 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is (apps/cli.py), so that every cleanup written for
    Ctrl-C runs; code that stops a reply on Ctrl-C and goes on (chat) lets this one through."""
