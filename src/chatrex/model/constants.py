"""Re-export of `chatrex.constants` (token ids, sentinels, special tokens) for model-side imports.

The definitions live at the top level so that light modules (the answer parser) can use them
without importing this package, which registers the transformers Auto classes.
"""

from chatrex.constants import *  # noqa: F401,F403
from chatrex.constants import __all__  # noqa: F401
