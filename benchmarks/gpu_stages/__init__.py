"""The stages of benchmarks/gpu_check.py, one module each, named by what it does (cuda_tests, speed,
paper_run, paper_table, capacity; each has run(Stage)), and what they share: running the project's
commands under a deadline (common), the kit check (kit, wheels, smoke_kit) and the report written
after every stage (report)."""
