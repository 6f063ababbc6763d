"""docmem: the parts of the project behind its top-level scripts (see docs/design.md).

Importing the package imports nothing else, so any module here can be imported alone.
"""
