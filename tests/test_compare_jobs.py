"""compare --jobs: runs trained side by side in worker processes give the numbers of the same runs
trained one after another with the workers' thread count."""

import os

import torch

from diff_transformer.train.compare import compare, default_jobs

from test_train import cache, corpus, quiet, small_run  # noqa: F401 - fixtures


def test_parallel_compare_equals_sequential_with_the_same_threads(tmp_path, corpus, cache, capsys):  # noqa: F811
    run = small_run(corpus, steps=3, eval_every=3, ckpt_every=0)
    logged = []
    par = compare(run, tmp_path / "par", seeds=[1], data_cache=cache, progress=False, log=logged.append,
                  n_parallel=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # what each of the 2 workers used
    try:
        seq = compare(run, tmp_path / "seq", seeds=[1], data_cache=cache, progress=False, log=quiet, n_parallel=1)
    finally:
        torch.set_num_threads(threads)
    for key in ("seed_1/diff", "seed_1/baseline"):
        assert par["runs"][key]["eval_curve"] == seq["runs"][key]["eval_curve"]
        assert par["runs"][key]["train_curve"] == seq["runs"][key]["train_curve"]
    assert any("2 at a time" in m for m in logged)
    assert "DIFF" in capsys.readouterr().out


def test_default_jobs():
    cpu = small_run(".", device="cpu")
    assert default_jobs(cpu) == (2 if (os.cpu_count() or 1) >= 2 else 1)
    assert default_jobs(small_run(".", device="cuda")) == 1
