"""Reading a YAML file someone else may have written (a merge recipe): a regular file of bounded
size, plain data only (`yaml.SafeLoader`), and aliases that expand to a bounded document. PyYAML
builds an alias as a shared reference, so a "billion laughs" file loads at once into an object
whose every traversal (a comparison, a repr in a message) then visits 10⁹ nodes: it is refused
before it is built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from weightlab.errors import InvalidArgument
from weightlab.io.files import NotARegularFile, read_regular

MAX_YAML_BYTES = 1 << 20  # a merge recipe is a few kilobytes
MAX_YAML_NODES = 100_000  # nodes of the document with every alias expanded


def _expanded_size(root: yaml.Node, where: str | Path) -> int:
    """Nodes of the document below `root` with each alias expanded in place (shared nodes counted
    at each use), without expanding anything; a node that contains itself is refused."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_YAML_NODES:
                raise InvalidArgument(
                    f"its aliases expand to more than {MAX_YAML_NODES} values; a merge recipe needs far fewer", where
                )
            continue
        if key in open_nodes:
            raise InvalidArgument("an alias refers to a value that contains it (a recursive document)", where)
        open_nodes.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise InvalidArgument("an alias refers to a value that contains it (a recursive document)", where)
            stack.append((child, False))
    return sizes[id(root)]


def read_yaml(path: str | Path) -> Any:
    """The plain data of a YAML file of one document (None for an empty one); one line naming the
    file for a file that is not a regular text file of at most MAX_YAML_BYTES, not YAML, or too
    large expanded."""
    documents = read_yaml_documents(path)
    if len(documents) > 1:
        raise InvalidArgument(f"holds {len(documents)} YAML documents where one is read", path)
    return documents[0] if documents else None


def read_yaml_documents(path: str | Path) -> list[Any]:
    """Every document of a YAML file (`---` between them), each read as `read_yaml` reads one; the
    expansion bound holds for the file as a whole."""
    try:
        text = read_regular(path, MAX_YAML_BYTES).decode("utf-8")
    except NotARegularFile as e:
        raise InvalidArgument(f"not a YAML text file of at most {MAX_YAML_BYTES >> 10} KiB ({e})", path) from None
    except UnicodeDecodeError:
        raise InvalidArgument("not a readable YAML text file (not UTF-8)", path) from None
    loader = yaml.SafeLoader(text)
    documents: list[Any] = []
    expanded = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            expanded += _expanded_size(node, path)
            if expanded > MAX_YAML_NODES:
                raise InvalidArgument(f"its documents expand to more than {MAX_YAML_NODES} values", path)
            documents.append(loader.construct_document(node))
        return documents
    except yaml.YAMLError as e:
        raise InvalidArgument(f"not valid YAML ({str(e).splitlines()[0]})", path) from None
    except RecursionError:
        raise InvalidArgument("not valid YAML (nested too deeply)", path) from None
    finally:
        loader.dispose()
