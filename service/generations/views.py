"""What the API shows of a generation: the stored row plus what is made when it is shown.

A signed download URL (it expires) and a waiting generation's place in its line are not
columns: they live here, beside the ORM row, never on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import sqlalchemy as sa

from service.models import Generation

GENERATIONS = cast(sa.Table, Generation.__table__)
# Every column of a generation, named as the model's attribute (`meta` for the "metadata"
# column): Core statements that read or return a whole row select these, and the row they
# give reads like the ORM object (`row.status`, `row.meta`...), without the cost of one.
COLUMNS = {attr.key: attr.columns[0] for attr in sa.inspect(Generation).column_attrs}
_BY_ID = sa.select(*(column.label(name) for name, column in COLUMNS.items())).where(
    GENERATIONS.c.id == sa.bindparam("generation_id")
)

# A generation as stored: the ORM object, or its COLUMNS read with Core.
GenerationRecord = Generation | sa.Row[Any]


def read_generation(connection: sa.Connection, generation_id: str) -> sa.Row[Any] | None:
    """One generation by id (its COLUMNS), with one Core statement; None when there is none."""
    return connection.execute(_BY_ID, {"generation_id": generation_id}).first()


@dataclasses.dataclass(frozen=True)
class GenerationView:
    """A generation as shown: its row, plus `signed_url` and `queue_position` when known.

    Every column of the row reads through (`view.status`, `view.result`...), so the response
    schemas dump a view as they would the row.
    """

    generation: GenerationRecord
    signed_url: str | None = None
    queue_position: int | None = None

    def __getattr__(self, name: str) -> Any:
        # Only called for names the view itself lacks: the row's columns.
        if name == "generation":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.generation, name)
