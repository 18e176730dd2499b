"""One document of a corpus source (its own module so that source loaders and their registry can both
import it)."""

from dataclasses import dataclass


@dataclass
class Document:
    text: str
    source: str
    doc_id: str
    title: str = ""
