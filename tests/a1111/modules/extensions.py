"""Mirrors the part of modules/extensions.py that callback naming uses: `extensions` (active
extensions), `Extension(name, path, enabled, is_builtin)` with `canonical_name`, and
`find_extension(filename)`: walks up from the file's folder, the nearest extension folder wins."""

import os


class Extension:
    def __init__(self, name, path, enabled=True, is_builtin=False):
        self.name, self.path, self.enabled, self.is_builtin = name, path, enabled, is_builtin
        self.canonical_name = name.lower()


extensions: list[Extension] = []


def active():
    return [x for x in extensions if x.enabled]


def find_extension(filename):
    paths = {os.path.realpath(e.path): e for e in extensions}
    parentdir = os.path.dirname(os.path.realpath(filename))
    while parentdir != filename:
        if parentdir in paths:
            return paths[parentdir]
        filename = parentdir
        parentdir = os.path.dirname(filename)
    return None
