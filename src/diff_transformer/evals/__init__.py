"""The evaluation suite: one file per measurement, each registering itself in base.TASKS.

The runner (runner.py) imports the modules named in :data:`TASK_MODULES` before it looks a task up.
"""

TASK_MODULES: list[str] = [
    "perplexity",
    "long_nll",
    "needle",
    "attention_noise",
    "outliers",
    "quantization",
    "lambda_",
    # evals2 tasks (icl, hallucination, zero_shot) go below this line.
    "icl",
    "hallucination",
    "zero_shot",
]
