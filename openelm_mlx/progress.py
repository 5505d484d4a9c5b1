"""Progress bars on stderr, drawn only where a person watches them (a terminal): redirected
output, logs and the one-line error of a failed run stay free of bar fragments."""

import sys

from tqdm import tqdm


def progress_bar(iterable=None, show: bool = True, **kwargs) -> tqdm:
    # disable=None is tqdm's "off unless stderr is a terminal"
    return tqdm(iterable, file=sys.stderr, disable=None if show else True, **kwargs)
