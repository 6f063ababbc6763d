"""The stages of benchmarks/gpu_check.py, one module each (stage_a ... stage_e), and what they share:
running the project's commands under a deadline (common), the kit check (kit, wheels, smoke_kit) and
the report written after every stage (report)."""
