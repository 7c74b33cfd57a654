"""What the API shows of a generation: the stored row plus what is made when it is shown.

A signed download URL (it expires) and a waiting generation's place in its line are not
columns: they live here, beside the ORM row, never on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from service.models import Generation


@dataclasses.dataclass(frozen=True)
class GenerationView:
    """A generation as shown: its row, plus `signed_url` and `queue_position` when known.

    Every column of the row reads through (`view.status`, `view.result`...), so the response
    schemas dump a view as they would the row.
    """

    generation: Generation
    signed_url: str | None = None
    queue_position: int | None = None

    def __getattr__(self, name: str) -> Any:
        # Only called for names the view itself lacks: the row's columns.
        if name == "generation":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.generation, name)
