"""What the README says about the command line, the quick start and the Python entry points
holds: its step-op example prints what it shows, its description of the baselines' arguments
matches their signatures, and it says how to get PyTorch's CPU build."""

from __future__ import annotations

import contextlib
import inspect
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    end = re.compile(r"^#{2,3} ", re.MULTILINE).search(README, start + len(title) + 2)
    return README[start : end.start() if end else None]


def test_step_op_example_prints_what_the_readme_shows():
    """The example runs and its output is the README's, in which the unsafe verdict's bias puts
    the refusal token (2) first and the safe verdict's takes it off the top."""
    text = section("### The step op")
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    shown = re.search(r"prints\n\n```text\n(.*?)```", text, re.DOTALL).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README step-op example", "exec"), {})
    assert out.getvalue() == shown
    contrast_only, steered = shown.splitlines()[:2]
    assert contrast_only == "tensor([0, 2, 0])" and steered == "tensor([2, 0, 0])"


def test_baselines_arguments_are_described_as_they_are():
    import safecode_kernels as sk
    from safecode_kernels.decoding.requests import prepare

    text = " ".join(section("### The decoder").split())
    assert "take the same arguments" not in text
    assert "naive_safecode_generate(model, processor, images, prompts, verdicts, **kwargs)" in text
    for fn in (sk.naive_safecode_generate, sk.two_cache_safecode_generate):
        assert list(inspect.signature(fn).parameters)[:5] == ["model", "processor", "images", "prompts", "verdicts"]
    # Every keyword the README lists for them is one they take (their **kwargs go to prepare).
    listed = text[text.index("Their keyword arguments are") : text.index("The fused decoder's greedy tokens")]
    names = set(re.findall(r"`(\w+)`", listed)) - {"generate", "recipe", "share_prefix", "prefill_chunk_tokens"}
    accepted = set(inspect.signature(prepare).parameters) | {"return_logits"}
    assert names and names <= accepted, names - accepted
    for name in ("recipe", "share_prefix", "prefill_chunk_tokens"):  # said not to be taken
        assert name not in accepted


def test_quick_start_unchanged_and_cpu_torch_explained():
    ci = (ROOT / ".ci" / "run").read_text()
    install = 'pip install torch==2.13.0 -e ".[test]" && safecode-kernels demo'
    assert install in ci and install in README  # CI runs the README's command word for word
    quick = section("## Quick start")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in quick
    assert "keeps pip from pulling a multi-GB CUDA build" not in README


def test_sensitive_top_k_zero_is_documented():
    assert "`K = 0` is an empty set: no refusal bias" in README
    assert "0: an empty set, so no refusal bias" in README


def test_trying_the_commands_without_downloads(tmp_path, monkeypatch, capsys):
    """The README's recipe for a model folder without downloads writes one that ``generate``
    answers from, exactly as its commands are written."""
    import shlex

    from safecode_kernels.app import cli

    text = README[README.index("**Trying the commands without downloading anything.**") :]
    block = re.search(r"```bash\n(.*?)```", text, re.DOTALL).group(1)
    code = re.search(r'python -c "(.*?)"\n', block, re.DOTALL).group(1)
    command = next(line for line in block.splitlines() if line.startswith("safecode-kernels generate"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README tiny-model recipe", "exec"), {})
    assert cli.main(shlex.split(command)[1:] + ["--no-progress"]) == 0
    assert "answer:" in capsys.readouterr().out
