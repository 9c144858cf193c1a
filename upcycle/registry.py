"""Named choices of one kind (routers, expert backends, recycling and merge methods, export formats, datasets): one
registry type, so every choice is registered, looked up and listed the same way, with a one-line description and
the paper it comes from.

    ROUTERS = Registry("router")

    @ROUTERS.register("topk")                   # description: the first line of the docstring; paper: its arXiv id
    class TopKRouter(Router): ...

    ROUTERS.get("topk"); ROUTERS.names(); ROUTERS.entries()
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
LINE = 150  # the longest description, in characters
ARXIV = re.compile(r"arXiv[ :]*(\d{4}\.\d{4,5})")
SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bAlg)(?<!\bFig)(?<!\bEq)\.\s")


def first_sentence(docstring: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(inspect.cleandoc(docstring).split("\n\n")[0].split()).replace("``", "`")
    sentence = SENTENCE_END.split(paragraph, maxsplit=1)[0].rstrip(".")
    return sentence if len(sentence) <= LINE else sentence[: sentence.rfind(" ", 0, LINE - 1)] + " …"


def _own_docstring(value: object) -> str | None:
    """A class's own docstring (not one it inherits, such as nn.Module's) or a function's; None for anything else."""
    if inspect.isclass(value):
        return vars(value).get("__doc__")
    return value.__doc__ if inspect.isroutine(value) else None


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    value: T
    description: str  # one line
    paper: str | None  # a link to the paper it implements, if any


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, description: str | None = None, paper: str | None = None) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``. ``description`` defaults to the first line of
        its docstring, ``paper`` to the first arXiv id in its docstring or its module's."""

        def decorator(value: T) -> T:
            self.add(name, value, description, paper)
            return value

        return decorator

    def add(self, name: str, value: T, description: str | None = None, paper: str | None = None) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        module = inspect.getmodule(value)
        texts = [text for text in (_own_docstring(value), module.__doc__ if module is not None else None) if text]
        if description is None:
            description = first_sentence(texts[0]) if texts else ""
        if paper is None:
            found = next((match for text in texts if (match := ARXIV.search(text))), None)
            paper = f"https://arxiv.org/abs/{found.group(1)}" if found else None
        self._entries[name] = Entry(name, value, description, paper)
        return value

    def get(self, name: str) -> T:
        return self.entry(name).value

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[name] for name in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
