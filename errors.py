"""One base for every error the pack raises about what it was given.

Why: a node, a script or a caller embedding the pack catches ``UltraGenError`` once instead of
knowing thirteen classes; each error keeps its builtin base as well (``ValueError`` for bad
inputs, ``RuntimeError`` for a state it cannot run in, ``ImportError`` for a missing host), so
code that catches those still works. Messages name what is wrong and what to change.
"""


class UltraGenError(Exception):
    """Something UltraGen cannot do with what it was given; the message says what to change."""
