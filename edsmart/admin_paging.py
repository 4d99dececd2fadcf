"""Admin paging that never counts millions of rows to draw one page.

Django's changelist counts the whole filtered queryset for its paginator ("99,873
deliveries", and the page links). At a year of history a school has a hundred thousand
deliveries and ops see ten million: the count took longer than the page. So the count stops
at ``EXACT_BELOW`` rows; a list longer than that shows the planner's own estimate
(``EXPLAIN``, from the table statistics autovacuum keeps) and the page says "about".
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
    """A paginator that counts at most ``EXACT_BELOW + 1`` rows; past that, its count is the
    planner's estimate (``estimated``), never less than what it counted."""

    estimated = False

    @cached_property
    def count(self) -> int:
        object_list = self.object_list
        if not isinstance(object_list, QuerySet):
            return super().count
        # COUNT over a LIMIT subquery: exact for any list up to the bound, whatever the
        # statistics say, and never more than the bound's worth of rows read.
        counted = object_list.order_by()[: EXACT_BELOW + 1].count()
        if counted <= EXACT_BELOW:
            return counted
        self.estimated = True
        return max(planner_rows(object_list) or 0, counted)
