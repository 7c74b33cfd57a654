"""Statements on the hot paths compile once: no parameter SQLAlchemy renders again per run."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import postgresql, sqlite

from service.domain import GenerationStatus, allowed_predecessors
from service.generations.lifecycle import _status_update


@pytest.mark.parametrize(
    "dialect", [postgresql.dialect(), sqlite.dialect()], ids=["postgresql", "sqlite"]
)
@pytest.mark.parametrize("new", [s for s in GenerationStatus if allowed_predecessors(s)])
def test_a_status_change_has_no_expanding_parameter(new: GenerationStatus, dialect: object) -> None:
    compiled = _status_update(new, ("status", "updated_at")).compile(dialect=dialect)
    assert not compiled.post_compile_params  # an `IN` of plain values would be one
    bound = [value for name, value in compiled.params.items() if name.startswith("param_")]
    assert sorted(bound) == sorted(s.value for s in allowed_predecessors(new))
