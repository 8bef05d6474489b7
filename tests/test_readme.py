"""The README as a user meets it: the make commands first, a quick start that runs, links that resolve, and
performance numbers that are the committed benchmark run's (benchmarks/plot_readme.py computes them)."""
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_first_commands_are_make_demo_and_make_test():
    first = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first[:2]] == ["make demo", "make test"]


def test_quick_start_runs():
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", README, re.S).group(1)
    scope = {}
    exec(compile(code, "README quick start", "exec"), scope)
    assert scope["loss"].dim() == 0 and scope["logits"].grad is not None


def test_links_resolve():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert "docs/semantics.md" in links and "docs/kernels.md" in links
    missing = [p for p in links if not p.startswith("http") and not os.path.exists(os.path.join(ROOT, p))]
    assert missing == []


def test_performance_numbers_are_the_committed_run():
    from benchmarks.plot_readme import rows
    with open(os.path.join(ROOT, "benchmarks", "results", "cpu", "results.json")) as f:
        result = json.load(f)
    got = {r["op"]: r for r in rows(result)}
    perf = README[README.index("## Performance"):README.index("## Docs")]
    assert f"commit {result['meta']['git_commit'][:7]}" in perf
    for op, text in (("ppo_loss_from_logits", "`ppo_loss_from_logits` (B=2, T=256, V=32000, forward + backward) ran"),
                     ("logprobs", "`logprobs` (N=512, V=32000)"), ("linear_logprobs", "`linear_logprobs` trades")):
        start = perf.index(text)
        number = float(re.search(r"(\d+\.\d+)×", perf[start:]).group(1))
        assert number == pytest.approx(got[op]["speedup"], abs=0.05), op
    assert got["ppo_loss_from_logits"]["mem_ref"] == pytest.approx(312, abs=0.5)
    assert got["ppo_loss_from_logits"]["mem_impl"] == 0
    assert os.path.exists(os.path.join(ROOT, "benchmarks", "results", "cpu", "readme_speedup.png"))
