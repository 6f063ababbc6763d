"""docmem: document-wise memory with guidance for LLMs (library modules beside the root scripts)."""
