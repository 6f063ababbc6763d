"""Forgetting one document: edits of the memory, unlearning, the key attack and its report."""
