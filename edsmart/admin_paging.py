"""Admin paging that never counts millions of rows to draw one page.

Django's changelist counts the whole filtered queryset for its paginator ("99,873
deliveries", and the page links). At a year of history a school has a hundred thousand
deliveries and ops see ten million: the count took longer than the page. Above
``EXACT_BELOW`` rows, the planner's own estimate (``EXPLAIN``, from the table statistics
autovacuum keeps) stands in for the count, and the page says "about". Below it, and for
every filtered list that the planner expects to be small, the count is exact.
"""

from __future__ import annotations

import json
from functools import cached_property

from django.core.paginator import Paginator
from django.db.models import QuerySet

EXACT_BELOW = 10_000


def planner_rows(queryset: QuerySet) -> int | None:
    """The planner's estimate of how many rows ``queryset`` returns, or None if unknown."""
    try:
        plan = json.loads(queryset.order_by().explain(format="json"))
        return int(plan[0]["Plan"]["Plan Rows"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class EstimatedCountPaginator(Paginator):
    """A paginator whose count is the planner's estimate when that is large (``estimated``)."""

    estimated = False

    @cached_property
    def count(self) -> int:
        object_list = self.object_list
        if isinstance(object_list, QuerySet):
            guess = planner_rows(object_list)
            if guess is not None and guess >= EXACT_BELOW:
                self.estimated = True
                return guess
        return super().count
