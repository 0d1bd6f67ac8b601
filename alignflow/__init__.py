"""alignflow: prompts and human labels into alignment data, alignment data into aligned models.

The code lives in four folders at the repository's top level (``schemas``, ``feedback``,
``trainers``, ``flows``) and imports as ``alignflow.schemas``, ``alignflow.feedback``,
``alignflow.trainers`` and ``alignflow.flows``: an install maps them under this package
(pyproject's ``package-dir``), so no bare top-level ``schemas`` or ``flows`` module is installed
to collide with other packages or a user's own modules.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# A source checkout used without installing (PYTHONPATH=checkout, e.g. tests/gpu.sh on a bare
# image): the four folders sit beside this one, not inside it.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "schemas")) and \
        os.path.isfile(os.path.join(_checkout, "schemas", "__init__.py")):
    __path__.append(_checkout)  # type: ignore[name-defined]  # noqa: F821
