"""pandas only where it is used: a short Arrow job need not pay for importing it.

pyarrow imports pandas the first time it turns a column into numpy or infers a type from a
Python value (``to_numpy``, ``pa.scalar(0)``), only to learn pandas' null markers and classes.
That import takes 0.15-0.25 s and 35-40 MB on a 2-core machine: most of a short
``alignflow convert``. A process holding no pandas objects loses nothing without it.

``arrow_without_pandas()`` hides pandas from pyarrow for the rest of a fresh process's command;
code that really uses pandas asks for it with ``import_pandas()``, which ends the hiding and
tells pyarrow that pandas is there from then on.
"""

from __future__ import annotations

import contextlib
import sys
from types import ModuleType
from typing import Iterator


class _HidePandas:
    """An import finder that, while ``hiding``, reports pandas as missing (pyarrow then works
    without it). Once installed it stays in ``sys.meta_path``, inert when not hiding: removing
    it while another thread walks the finder list could make that walk skip the next finder."""

    hiding = False

    def find_spec(self, name, path=None, target=None):
        if self.hiding and name == "pandas":
            raise ModuleNotFoundError("pandas is hidden from pyarrow in this command; code that uses pandas "
                                      "imports it with alignflow.schemas.pandas_free.import_pandas()", name=name)
        return None


_finder = _HidePandas()


@contextlib.contextmanager
def arrow_without_pandas() -> Iterator[None]:
    """Keep pyarrow from importing pandas until ``import_pandas()`` is called.

    Only for a process that runs one command and exits (the CLI's own process): in a long-lived
    one (a notebook, a test runner, a Prefect worker), something imported later could hand
    pyarrow a pandas object before pyarrow knew pandas was there. Does nothing where pandas is
    already loaded."""
    if "pandas" in sys.modules or _finder.hiding:
        yield
        return
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    _finder.hiding = True
    try:
        yield
    finally:
        _finder.hiding = False
        _tell_pyarrow()


def import_pandas() -> ModuleType:
    """``import pandas``, also inside ``arrow_without_pandas()``: from here on pyarrow sees it."""
    _finder.hiding = False
    import pandas

    _tell_pyarrow()
    return pandas


def _tell_pyarrow() -> None:
    """pyarrow's lazy pandas importer answered "no pandas" while it was hidden; once pandas is
    loaded, asking it for pandas makes it look again (its other checks then see pandas too)."""
    shim = getattr(sys.modules.get("pyarrow.lib"), "_pandas_api", None)  # private to pyarrow: optional
    if shim is not None and "pandas" in sys.modules:
        with contextlib.suppress(ImportError):
            shim.pd
