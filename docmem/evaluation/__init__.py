"""Measurements of a trained memory, one module each (docs/design.md, "Evaluation").

options (EvalOptions), key_ce (CE under own and negative keys, during training),
generation (greedy continuations and their ROUGE recall), ce_table (the document x key CE
matrix), landscape (the key landscape, selection statistics, L0 against length), pipeline
(every measurement of one run into run_N/eval/), compare (several runs side by side).
"""
