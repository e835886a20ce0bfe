"""matplotlib, optional (``pip install 'attngen[plot]'``), for the commands that draw a PNG:
one place that loads it off-screen and one error for a missing one, naming the option
that asked for the picture."""

from __future__ import annotations

import importlib.util
from typing import Any

from attngen.errors import AttngenError


def _missing(option: str) -> AttngenError:
    return AttngenError(f"{option} needs matplotlib: pip install 'attngen[plot]'")


def require(option: str) -> None:
    """An AttngenError now, before any work, if ``option``'s picture could not be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise _missing(option)


def pyplot(option: str) -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise _missing(option) from None
    return plt
