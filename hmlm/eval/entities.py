"""Which entity a task item is about, as any lm-eval task declares it, and which entities share a name.

A task opts into frequency buckets in its YAML `metadata` (lm-eval keeps that mapping as it is):

    metadata:
      hmlm_entity: country              # the doc field naming the item's entity, or a function of the doc:
                                        #   !function utils.doc_to_entity  (returns a name, a list of names with
                                        #   the main one first, or a dict with name / aliases / key)
      hmlm_aliases: other_names         # optional doc field: other spellings (a list or one string)
      hmlm_entity_key: qid              # optional doc field: a stable id; items with one key are one entity
      hmlm_relation: capital            # optional: the fact relation (with the bundled corpus, its recorded counts)

Entities, not spellings, are compared. The known entities are the bundled facts' (elements, countries, cities, by
entity key). An item whose key is a known key is that entity; otherwise its main name is looked up among the known
entities' main names, then among all their spellings (only entities of the item's relation when that decides):
exactly one match makes the item that entity ("France" in an external capital task is country/FR), none or several
make it a new entity of its own. A spelling that two different entities share is flagged ("'Mexico' also names ..."),
as are names that are everyday words ("lead", "china"): their corpus counts mix senses or entities.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from . import EvalError
from .mentions import words

# Entity names that are also everyday English words or common names, so whole-word counts include other senses.
# Curated from the bundled tables (elements, countries, cities); extend with `hmlm eval --ambiguous WORD,...`.
AMBIGUOUS_WORDS = frozenset({
    "lead", "iron", "gold", "silver", "tin", "copper", "zinc", "nickel", "mercury", "carbon", "cobalt", "neon",
    "platinum", "chad", "china", "turkey", "georgia", "jordan", "guinea", "jersey", "nice", "reading", "bath",
    "mobile", "split", "victoria", "florence", "orange", "santiago", "salem", "hamilton", "lincoln",
})

METADATA_KEYS = ("hmlm_entity", "hmlm_aliases", "hmlm_entity_key", "hmlm_relation")


def norm(name: str) -> str:
    return " ".join(words(name))


@dataclass(frozen=True)
class EntityItem:
    """What one task item says about its entity."""

    name: str
    aliases: tuple[str, ...] = ()
    key: str | None = None
    relation: str | None = None

    @property
    def spellings(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    return tuple(str(v) for v in value if str(v).strip())


@dataclass(frozen=True)
class EntitySpec:
    """A task's `metadata.hmlm_*` declaration (see the module docstring)."""

    task: str
    entity: str | Callable[[dict], Any]
    aliases: str | None = None
    key: str | None = None
    relation: str | None = None

    @classmethod
    def from_metadata(cls, task: str, metadata: Mapping | None) -> "EntitySpec | None":
        metadata = metadata or {}
        entity = metadata.get("hmlm_entity")
        if entity is None:
            return None
        if not (callable(entity) or (isinstance(entity, str) and entity.strip())):
            raise EvalError(f"task {task}: metadata.hmlm_entity must be a doc field name or !function, "
                            f"got {entity!r}")
        for name in ("hmlm_aliases", "hmlm_entity_key", "hmlm_relation"):
            value = metadata.get(name)
            if value is not None and not isinstance(value, str):
                raise EvalError(f"task {task}: metadata.{name} must be a string, got {value!r}")
        return cls(task, entity, metadata.get("hmlm_aliases"), metadata.get("hmlm_entity_key"),
                   metadata.get("hmlm_relation"))

    def _field(self, doc: Mapping, field_name: str) -> Any:
        if field_name not in doc:
            raise EvalError(f"task {self.task}: metadata names the doc field {field_name!r}, but the task's "
                            f"documents have only {', '.join(sorted(map(str, doc)))}")
        return doc[field_name]

    def item(self, doc: Mapping) -> EntityItem:
        key = None
        if callable(self.entity):
            value = self.entity(dict(doc))
            if isinstance(value, Mapping):
                names = (*_strings(value.get("name")), *_strings(value.get("aliases")))
                key = value.get("key")
            else:
                names = _strings(value)
        else:
            names = _strings(self._field(doc, self.entity))
        if not names:
            raise EvalError(f"task {self.task}: an item has no entity name (metadata.hmlm_entity={self.entity!r})")
        aliases = names[1:] + (_strings(self._field(doc, self.aliases)) if self.aliases else ())
        if self.key:
            key = self._field(doc, self.key)
        return EntityItem(names[0], tuple(dict.fromkeys(a for a in aliases if a != names[0])),
                          None if key is None else str(key), self.relation)


class EntityBook:
    """The entities known to one evaluation: the bundled facts' plus every resolved task item's new ones."""

    def __init__(self, known: Iterable[tuple[str, Sequence[str], str | None]] = (),
                 ambiguous: frozenset[str] = AMBIGUOUS_WORDS):
        self.spellings: dict[str, tuple[str, ...]] = {}     # entity key -> its names, main name first
        self.relations: dict[str, set[str]] = {}
        self._main: dict[str, set[str]] = {}                 # normalised main name -> keys
        self._any: dict[str, set[str]] = {}                  # normalised spelling -> keys
        self.ambiguous = ambiguous
        for key, names, relation in known:
            self._add(key, names, relation)

    @classmethod
    def bundled(cls, ambiguous: Iterable[str] = ()) -> "EntityBook":
        """The bundled facts' entities (elements, countries, cities), one per entity key."""
        from ..data.bundled import load_fact_items

        return cls(((it.entity_key, (it.entity, *it.aliases), it.relation) for it in load_fact_items()),
                   AMBIGUOUS_WORDS | {norm(w) for w in ambiguous})

    def _add(self, key: str, names: Sequence[str], relation: str | None) -> None:
        old = self.spellings.get(key, ())
        self.spellings[key] = tuple(dict.fromkeys((*old, *names)))
        if relation:
            self.relations.setdefault(key, set()).add(relation)
        if not old and names:
            self._main.setdefault(norm(names[0]), set()).add(key)
        for n in names:
            self._any.setdefault(norm(n), set()).add(key)

    def resolve(self, item: EntityItem) -> str:
        """The key of the entity `item` is about; a new entity is added under the item's key or its name."""
        if item.key is not None and item.key in self.spellings:
            return item.key
        name = norm(item.name)
        for index in (self._main, self._any):
            candidates = index.get(name, set())
            if item.relation:
                same = {k for k in candidates if item.relation in self.relations.get(k, ())}
                candidates = same or candidates
            if len(candidates) == 1:
                (key,) = candidates
                self._add(key, item.aliases, item.relation)   # the item's extra spellings name it too
                return key
            if candidates:
                break   # several entities have this name: the item is none of them for sure
        key = item.key if item.key is not None else f"entity:{name}"
        self._add(key, item.spellings, item.relation)
        return key

    def flags(self, key: str) -> list[str]:
        out = []
        for n in self.spellings[key]:
            normed = norm(n)
            if normed in self.ambiguous:
                out.append(f"'{n}' is a common word")
            others = self._any.get(normed, set()) - {key}
            if others:
                out.append(f"'{n}' also names {', '.join(sorted(others))}")
        return out
