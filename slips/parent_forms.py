"""The form on a parent's slip page: one answer block per child the link covers.

Fields are named by student id (``consent_<id>``, ``answer_<id>``) so one POST answers for
several children. Any such field naming a student the link does not cover is reported by
``foreign_student_ids`` and the whole request is refused, so a crafted POST cannot answer for
another family's child.

Submitted field names are anyone's input: ids in them are compared as text, never converted
with ``int()``, which refuses more than 4,300 digits (``consent_`` and 5,000 digits was a 500).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django import forms

from slips.links import Child

YES, NO = "yes", "no"
MAX_ANSWER_LENGTH = 2000
# ASCII digits only: ``\d`` would also take other scripts' digits, which int() reads as numbers.
_FIELD = re.compile(r"(?:consent|answer)_([0-9]+)", re.ASCII)


@dataclass(frozen=True)
class Block:
    """What the template needs for one child: the child and its bound fields."""

    child: Child
    consent: forms.BoundField
    answer: forms.BoundField | None


class SlipAnswerForm(forms.Form):
    def __init__(
        self,
        data: Mapping[str, Any] | None = None,
        *,
        children: Sequence[Child],
        free_text_question: str = "",
    ) -> None:
        self.children = list(children)
        initial: dict[str, str] = {}
        for c in self.children:
            if c.response is not None:
                initial[f"consent_{c.student.pk}"] = YES if c.response.consent else NO
                initial[f"answer_{c.student.pk}"] = c.response.answer
        super().__init__(data, initial=initial)
        for c in self.children:
            self.fields[f"consent_{c.student.pk}"] = forms.ChoiceField(
                label=c.student.full_name,
                choices=[(YES, "Yes"), (NO, "No")],
                widget=forms.RadioSelect,
                # Not required per child: a parent may answer one child now and one later.
                required=False,
            )
            if free_text_question:
                self.fields[f"answer_{c.student.pk}"] = forms.CharField(
                    label=free_text_question,
                    required=False,
                    max_length=MAX_ANSWER_LENGTH,
                    widget=forms.Textarea(attrs={"rows": 3}),
                )

    def foreign_student_ids(self) -> set[str]:
        """Student ids (as text, without leading zeros) named by submitted fields that this
        page does not cover. Never converted to numbers: a crafted name may hold any number of
        digits."""
        covered = {str(c.student.pk) for c in self.children}
        named = {
            m.group(1).lstrip("0") or "0"
            for key in self.data
            if isinstance(key, str) and (m := _FIELD.fullmatch(key))
        }
        return named - covered

    def blocks(self) -> list[Block]:
        return [
            Block(
                child=c,
                consent=self[f"consent_{c.student.pk}"],
                answer=self[f"answer_{c.student.pk}"]
                if f"answer_{c.student.pk}" in self.fields
                else None,
            )
            for c in self.children
        ]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        chosen = 0
        for c in self.children:
            consent = cleaned.get(f"consent_{c.student.pk}")
            if consent:
                chosen += 1
            elif cleaned.get(f"answer_{c.student.pk}", "").strip():
                self.add_error(
                    f"consent_{c.student.pk}", f"Please choose yes or no for {c.student.full_name}."
                )
        if not chosen and not self.errors:
            raise forms.ValidationError("Please choose yes or no for at least one child.")
        return cleaned

    def answers(self) -> dict[int, tuple[bool, str]]:
        """{student id: (consent, answer)} for every child given a yes or no."""
        result: dict[int, tuple[bool, str]] = {}
        for c in self.children:
            consent = self.cleaned_data.get(f"consent_{c.student.pk}")
            if consent:
                answer = self.cleaned_data.get(f"answer_{c.student.pk}", "") or ""
                result[c.student.pk] = (consent == YES, answer)
        return result
